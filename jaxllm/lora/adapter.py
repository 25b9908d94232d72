"""A LoRA adapter as a pytree, and its fusion onto the model's fused projections.

An adapter holds, per targeted module in Hugging Face's names (`q_proj`, `v_proj`, `down_proj`, ...), the
low-rank pair of every layer: a [layers, in, rank] and b [layers, rank, out] (PEFT's lora_A and lora_B,
transposed), so that the module's output gains scale * (x @ a @ b). The model runs q, k and v as one
matmul (and gate and up as one): `fuse` lays an adapter out on those fused weights, each part's ranks
side by side and each part's b on its rows of the fused output, which equals adding each module's term.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.errors import InvalidRequestError
from jaxllm.models.describe import Param
from jaxllm.models.registry import describe_params

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank and alpha as PEFT names them (r, lora_alpha); targets: Hugging Face module names adapted;
    rslora: scale alpha / sqrt(rank) instead of alpha / rank."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Adapter:
    """weights: module name -> {"a": [layers, in, rank], "b": [layers, rank, out]}; config is static."""

    weights: dict
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a Hugging Face module lives in the model: the fused param, its part, and the part's size."""

    param: Param
    part: int
    name: str


def targets(cfg: ModelConfig) -> dict[str, Target]:
    """Every module an adapter may target: name -> `Target`, from the family's per-layer matmul params
    (each checkpoint name `...{i}.<prefix>.<module>.weight` is one part of its param)."""
    out = {}
    for p in describe_params(cfg).values():
        if p.kind != "matmul" or p.path[0] != "layers":
            continue
        for part, name in enumerate(p.hf):
            out[name.removesuffix(".weight").rsplit(".", 1)[-1]] = Target(p, part, name)
    return out


def part_sizes(cfg: ModelConfig, p: Param) -> tuple[int, int, list[int]]:
    """(in features, out features of the fused checkpoint rows, each part's rows) of a fused param."""
    k = math.prod(p.in_dims(cfg))
    n = p.source_rows(cfg) if p.source_rows else math.prod(p.out_dims(cfg))
    parts = len(p.hf)
    if parts == 1:
        return k, n, [n]
    if p.path[-1] == "qkv":
        kv = (cfg.source_kv_heads or cfg.num_kv_heads) * cfg.head_dim
        return k, n, [n - 2 * kv, kv, kv]
    return k, n, [n // parts] * parts


def check_targets(cfg: ModelConfig, names) -> None:
    known = targets(cfg)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InvalidRequestError(
            f"LoRA targets {unknown or '[]'} are not modules of this model; choose from {', '.join(known)}"
        )


def init(cfg: ModelConfig, config: LoraConfig = LoraConfig(), key=None, dtype=jnp.float32) -> Adapter:
    """A fresh adapter: a uniform in +-1/sqrt(in) (PEFT's default), b zero (the adapter starts as a no-op)."""
    check_targets(cfg, config.targets)
    key = jax.random.PRNGKey(0) if key is None else key
    known, weights = targets(cfg), {}
    for name, k in zip(config.targets, jax.random.split(key, len(config.targets)), strict=True):
        t = known[name]
        fan_in, _, rows = part_sizes(cfg, t.param)
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (cfg.num_layers, fan_in, config.rank), dtype, -bound, bound)
        weights[name] = {"a": a, "b": jnp.zeros((cfg.num_layers, config.rank, rows[t.part]), dtype)}
    return Adapter(weights, config)


def fuse(adapter: Adapter, cfg: ModelConfig) -> dict[tuple[str, ...], dict]:
    """The adapter on the model's fused params: path -> {"a": [layers, K, R], "b": [layers, R, N]} with R the
    sum of the parts' ranks, K and N the param's in and out features in its own order, the scale in b.
    Pure and differentiable in the adapter's weights."""
    known, grouped = targets(cfg), {}
    for name, w in adapter.weights.items():
        t = known[name]
        grouped.setdefault(t.param.path, (t.param, []))[1].append((t.part, w))
    out = {}
    for path, (p, parts) in grouped.items():
        _, n_src, rows = part_sizes(cfg, p)
        offsets = [sum(rows[:i]) for i in range(len(rows))]
        a = jnp.concatenate([w["a"] for _, w in parts], axis=-1)
        pieces = []
        for part, w in parts:  # each part's b on its checkpoint rows, zero elsewhere
            lo, hi = offsets[part], offsets[part] + rows[part]
            pieces.append(jnp.pad(w["b"], ((0, 0), (0, 0), (lo, n_src - hi))))
        b = jnp.concatenate(pieces, axis=1) * adapter.config.scale
        if p.rows is not None:  # into the fused layout's row order
            b = b[:, :, jnp.asarray(p.rows(cfg))]
        out[path] = {"a": a, "b": b}
    return out
