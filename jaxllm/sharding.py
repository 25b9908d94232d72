"""Logical axis names and their mapping to mesh axes: the one place where sharding is decided.

Model code names the axes of every parameter and activation with the logical names below; the rules map
those names to mesh axes. A `Placement` (a ('data', 'model') mesh and its rules) is chosen once, from the
tensor- and data-parallel sizes, and handed to the loader (each param placed in its sharding), the KV
cache (sharded over KV heads) and the runner (whose compiled steps trace under `Placement.active()`, so
that the native and Pallas kernels, which XLA cannot partition, run per shard under `shard_map`). On one
device there is no placement and every array lives on the default device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig
from jaxllm.errors import PlacementError

LOGICAL_AXES = ("batch", "seq", "layers", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "vocab", "pages")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis (or None: replicated) each logical axis is split over."""

    batch: str | None = "data"
    seq: str | None = None
    layers: str | None = None
    embed: str | None = None
    q_heads: str | None = "model"
    kv_heads: str | None = "model"
    head_dim: str | None = None
    mlp: str | None = "model"
    vocab: str | None = "model"
    pages: str | None = "data"  # the KV pool's pages: each data-parallel replica holds its own share

    def as_flax_rules(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((name, getattr(self, name)) for name in LOGICAL_AXES)

    def axis(self, logical: str | None) -> str | None:
        """The mesh axis of one logical axis (None for None)."""
        return getattr(self, logical) if logical else None

    def spec(self, logical: tuple[str | None, ...]) -> PartitionSpec:
        """The PartitionSpec for an array with these logical axes; refuses one mesh axis used twice."""
        mesh_axes = [self.axis(name) for name in logical]
        used = [a for a in mesh_axes if a is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {logical} map two dimensions onto one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A 2-D ('data', 'model') mesh over the first data*model devices."""
    devices = list(devices if devices is not None else jax.devices())[: data * model]
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and the rules that map logical axes onto it."""

    mesh: Mesh
    rules: ShardingRules = ShardingRules()

    @property
    def tensor_parallel(self) -> int:
        return self.mesh.shape["model"]

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"]

    def axis_size(self, mesh_axis: str | None) -> int:
        return self.mesh.shape[mesh_axis] if mesh_axis else 1

    def sharding(self, logical: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.spec(logical))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @contextlib.contextmanager
    def active(self):
        """Trace under this placement: `jax.set_mesh` for JAX, `active()` for the kernels' shard_map."""
        token = _ACTIVE.set(self)
        try:
            with jax.set_mesh(self.mesh):
                yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("jaxllm_placement", default=None)


def placed(placement: Placement | None):
    """The context to trace and run compiled steps in: the placement's (`Placement.active`), or none."""
    return placement.active() if placement is not None else contextlib.nullcontext()


def active() -> Placement | None:
    """The placement being traced under (see `Placement.active`), or None: one device."""
    return _ACTIVE.get()


def _divides(cfg: ModelConfig, tp: int) -> bool:
    """Whether tensor parallelism `tp` splits the query heads, and the KV heads either split or replicate."""
    kv = cfg.num_kv_heads
    return cfg.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def choose_placement(
    cfg: ModelConfig, tensor_parallel: int | None = None, data_parallel: int = 1, devices=None
) -> Placement | None:
    """The placement for `cfg` over the local devices (None for one device).

    tensor_parallel None: the largest size that fits the devices left after `data_parallel` and splits the
    query heads (the KV heads split too, or are replicated in equal groups). Raises PlacementError for a size
    that does not divide the heads or more devices than exist.
    """
    if devices is None:  # in a multi-process group, the mesh spans every process's devices
        devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    devices = list(devices)
    if data_parallel < 1 or (tensor_parallel is not None and tensor_parallel < 1):
        raise PlacementError("--tensor-parallel and --data-parallel must be at least 1")
    if tensor_parallel is None:
        room = max(1, len(devices) // data_parallel)
        tensor_parallel = max(t for t in range(1, room + 1) if _divides(cfg, t))
    if not _divides(cfg, tensor_parallel):
        raise PlacementError(
            f"tensor parallelism {tensor_parallel} does not split the model's {cfg.num_heads} query heads and "
            f"{cfg.num_kv_heads} KV heads evenly: choose a size that divides the query heads and divides, or is a "
            f"multiple of, the KV heads (e.g. {max(t for t in range(1, tensor_parallel) if _divides(cfg, t))})"
        )
    needed = tensor_parallel * data_parallel
    if needed > len(devices):
        raise PlacementError(
            f"tensor parallelism {tensor_parallel} x data parallelism {data_parallel} needs {needed} devices, "
            f"but {len(devices)} are available"
        )
    if needed == 1:
        return None
    return Placement(make_mesh(data_parallel, tensor_parallel, devices), rules_for(cfg, tensor_parallel))


def rules_for(cfg: ModelConfig, tensor_parallel: int) -> ShardingRules:
    """The default rules, with the MLP and vocabulary axes replicated where the size does not divide them."""
    divides = lambda n: n % tensor_parallel == 0
    return ShardingRules(
        mlp="model" if divides(cfg.intermediate_size) else None,
        vocab="model" if divides(cfg.vocab_size) else None,
    )


def shard_config(cfg: ModelConfig, placement: Placement | None) -> ModelConfig:
    """The config the model runs under this placement: with fewer KV heads than the tensor-parallel size,
    each KV head is stored `tp // kv_heads` times (one copy per device of its query-head group)."""
    tp = placement.tensor_parallel if placement else 1
    if cfg.num_kv_heads % tp == 0:
        return cfg
    return dataclasses.replace(cfg, num_kv_heads=tp, source_kv_heads=cfg.source_kv_heads or cfg.num_kv_heads)


def rows_axis(placement: Placement, rows: int, paged: bool = False) -> str | None:
    """The mesh axis a batch of `rows` is split over: the data-parallel one, when the replicas share it evenly.

    paged: the rows read or write the KV pool, whose pages the replicas hold apart, so they must split (rows
    come grouped by replica, with page ids of their replica's pool): raises ValueError when they cannot."""
    axis = placement.rules.batch
    if rows % placement.axis_size(axis) == 0:
        return axis
    if paged and placement.axis_size(placement.rules.pages) > 1:
        raise ValueError(
            f"{rows} rows do not split over {placement.data_parallel} data-parallel replicas, whose KV pages are "
            "apart: give each replica the same number of rows"
        )
    return None


def pool_spec(placement: Placement, ndim: int) -> PartitionSpec:
    """The spec of a KV pool [(layers,) num_pages, page_size, kv_heads, head_dim]: pages split over the
    data-parallel replicas, heads over the tensor-parallel devices."""
    return PartitionSpec(*(None,) * (ndim - 4), placement.rules.pages, None, placement.rules.kv_heads, None)


def _spec_for(leaf, placement: Placement) -> PartitionSpec:
    """A leaf's spec from its logical names, with any dim its mesh axis does not divide replicated."""
    names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(leaf.shape)
    shape = leaf.value.shape if isinstance(leaf, nn.Partitioned) else leaf.shape
    axes = [placement.rules.axis(n) for n in names]
    fits = lambda a, d: a if a and d % placement.axis_size(a) == 0 else None
    return PartitionSpec(*(fits(a, d) for a, d in zip(axes, shape, strict=True)))


def param_shardings(boxed_shapes, mesh_or_placement, rules: ShardingRules = ShardingRules()):
    """NamedShardings for a tree of `nn.Partitioned`-boxed shapes (as from `jax.eval_shape(init)`).

    Takes a Placement, or a mesh and rules. A dim its mesh axis does not divide is replicated; so are all
    the arrays of a quantized weight along an axis that any one of them cannot split (`quantized_axes`)."""
    from jaxllm.quant.format import QuantizedWeight

    placement = mesh_or_placement if isinstance(mesh_or_placement, Placement) else Placement(mesh_or_placement, rules)
    boxed = lambda x: isinstance(x, nn.Partitioned)

    def one(leaf):
        if isinstance(leaf, QuantizedWeight):
            return _quantized_shardings(leaf, placement)
        return NamedSharding(placement.mesh, _spec_for(leaf, placement))

    return jax.tree.map(one, boxed_shapes, is_leaf=lambda x: boxed(x) or isinstance(x, QuantizedWeight))


def quantized_axes(w, placement: Placement) -> tuple[str | None, str | None]:
    """The mesh axes a QuantizedWeight [..., N, K] is split over along N and K under `placement`: its logical
    axes' mesh axes, where they divide N, and K's stored values and groups (a device holds whole groups)."""
    n_ax, k_ax = (placement.rules.axis(a) for a in w.axes)
    size = placement.axis_size
    shape = lambda a: a.value.shape if isinstance(a, nn.Partitioned) else a.shape
    n, kq, groups = shape(w.q)[-2], shape(w.q)[-1], shape(w.scale)[-1]
    if n % size(n_ax):
        n_ax = None
    if kq % size(k_ax) or (groups > 1 and groups % size(k_ax)) or k_ax == n_ax:
        k_ax = None
    return n_ax, k_ax


def quantized_specs(w, placement: Placement):
    """A QuantizedWeight of PartitionSpecs for w's arrays (see `quantized_axes`); leading dims replicated."""
    n_ax, k_ax = quantized_axes(w, placement)
    shape = lambda a: a.value.shape if isinstance(a, nn.Partitioned) else a.shape
    lead = (None,) * (len(shape(w.q)) - 2)
    grouped = shape(w.scale)[-1] > 1
    q = PartitionSpec(*lead, n_ax, k_ax)
    scale = PartitionSpec(*lead, n_ax, k_ax if grouped else None)
    return dataclasses.replace(w, q=q, scale=scale, offset=scale if w.offset is not None else None)


def _quantized_shardings(w, placement: Placement):
    """A QuantizedWeight (of boxed shapes) of NamedShardings (see `quantized_specs`)."""
    specs = quantized_specs(w, placement)
    return jax.tree.map(
        lambda s: NamedSharding(placement.mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def device_bytes(tree) -> dict:
    """Bytes of `tree`'s arrays held on each device, from their addressable shards: {device: bytes}."""
    out: dict = {}
    for a in jax.tree.leaves(tree):
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + math.prod(s.data.shape) * s.data.dtype.itemsize
    return out
