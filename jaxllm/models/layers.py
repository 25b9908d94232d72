"""Layers shared by the model families: RMSNorm, rotary embeddings, gated MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm import quant
from jaxllm.config import ModelConfig
from jaxllm.models.describe import Param
from jaxllm.quant.format import Q_DTYPES, QuantizedWeight, stored_k
from jaxllm.quant.plan import QuantPlan
from jaxllm.quant.rows import Format


def param(module: nn.Module, name: str, shape, axes: tuple[str, ...], init=None, dtype=jnp.float32, stack: int = 0):
    """A parameter with logical axis names attached (the single description of that array).

    stack: the number of layers stacked in front ([stack, *shape], axis 'layers'), or 0 for none. Stacked
    params are broadcast into the layer scan whole and read at the layer's index by their consumer."""
    init = init or nn.initializers.normal(0.02)
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def weight(module: nn.Module, p: Param, cfg: ModelConfig, plan: QuantPlan | None, dtype=jnp.float32, stack: int = 0):
    """The weight `p` describes: a float array in its float layout, or the `QuantizedWeight` [N, K] the plan
    asks for (N over p's out dims, K over its in dims); with `stack`, all layers' stacked in front. Either
    goes to `quant.einsum` / `quant.take` (with the layer index when stacked)."""
    ins, outs = p.in_dims(cfg), p.out_dims(cfg)
    fmt = plan.get(p.path) if plan else None
    if fmt is None:
        if p.kind == "embedding":
            return param(module, p.path[-1], outs + ins, p.out_axes + p.in_axes, dtype=dtype, stack=stack)
        return param(module, p.path[-1], ins + outs, p.in_axes + p.out_axes, dtype=dtype, stack=stack)
    return module.param(p.path[-1], _quantized_init(fmt, ins, outs, (p.out_axes[0], p.in_axes[0]), stack))


def adapter(module: nn.Module, name: str, ids) -> quant.Lora | None:
    """The LoRA adapters of the module's weight `name` (the 'lora' collection, with the weight's path and
    name) for rows whose slots are `ids` [batch, seq], or None when there are none or no ids."""
    if ids is None or not module.has_variable("lora", name):
        return None
    v = module.get_variable("lora", name)
    return quant.Lora(v["a"], v["b"], ids)


def _quantized_init(
    fmt: Format, ins: tuple[int, ...], outs: tuple[int, ...], names: tuple[str | None, str | None], stack: int = 0
):
    """An initializer of a `QuantizedWeight` of zeros with logical axes on every array (for shapes and shardings).

    N takes the name of the first out dim and K that of the first in dim: both are the major dims of their
    flattening, so splitting N or K into contiguous shards splits those logical dims."""
    n, k = math.prod(outs), math.prod(ins)
    group = fmt.group_for(k)
    q_dtype, q_k = Q_DTYPES[fmt.kind], stored_k(fmt.kind, k)

    # One scale per row (per channel) has nothing along K to split.
    group_names = names if group < k else (names[0], None)
    lead, lead_names = ((stack,), ("layers",)) if stack else ((), ())

    def init(_rng):
        box = lambda a, names=group_names: nn.Partitioned(a, lead_names + names)
        offset = box(jnp.zeros((*lead, n, k // group), jnp.float32)) if fmt.offset else None
        scale = box(jnp.ones((*lead, n, k // group), jnp.float32))
        q = box(jnp.zeros((*lead, n, q_k), q_dtype), names)
        return QuantizedWeight(q, scale, offset, fmt.kind, group, ins, outs, names)

    return init


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32: x[..., d] -> [..., d]."""

    eps: float
    axis_name: str = "embed"
    dtype: jnp.dtype = jnp.float32
    stack: int = 0

    @nn.compact
    def __call__(self, x, layer=None):
        """x [..., d]; layer: the index into a stacked scale (see `param`)."""
        scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.dtype, self.stack)
        if self.stack:
            scale = scale[layer]
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions, inv_freq: np.ndarray):
    """cos, sin tables [batch, seq, head_dim] for integer positions [batch, seq] (rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate x [batch, seq, heads, head_dim] by cos/sin [batch, seq, head_dim] (Hugging Face layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); x [batch, seq, embed].

    gate_up and down are described by `params` (the family's `Param`s for 'gate_up' and 'down'); gate and
    up run as one matmul: fewer, larger dots read the weights faster on every backend."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: QuantPlan | None = None
    params: tuple[Param, Param] | None = None
    stack: int = 0

    @nn.compact
    def __call__(self, x, layer=None, lora_ids=None):
        """x [batch, seq, embed]; layer: the index into stacked weights (see `param`); lora_ids [batch, seq]:
        each token's adapter slot (see `adapter`)."""
        p_gate_up, p_down = self.params
        gate_up = weight(self, p_gate_up, self.cfg, self.quant, self.dtype, self.stack)
        down = weight(self, p_down, self.cfg, self.quant, self.dtype, self.stack)
        lora = adapter(self, p_gate_up.path[-1], lora_ids)
        gu = quant.einsum("btd,dfc->btfc", x, gate_up, layer=layer, lora=lora).astype(self.dtype)
        h = nn.silu(gu[..., 0]) * gu[..., 1]
        lora = adapter(self, p_down.path[-1], lora_ids)
        return quant.einsum("btf,fd->btd", h, down, layer=layer, lora=lora).astype(self.dtype)
