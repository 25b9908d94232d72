"""Assemble the Flax param tree (stacked or per-layer, float or quantized) from a checkpoint's tensors.

What to read and how to lay it out comes from the family's description (`models.describe.Param`); what
each param looks like (shape, float or `QuantizedWeight`) from the model's own `eval_shape`. A source only
provides `read(hf_name)` (float, Hugging Face layout) and, for quantized params, `read_rows(hf_name)`
(`QuantRows` [out, in]: a GGUF tensor repacked as it is stored, or a float tensor quantized in situ).
Per-layer tensors are read one layer at a time and copied into their stack on the device in place, so
host memory holds at most one float layer beyond the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.errors import ModelLoadError
from jaxllm.loading.host_memory import release_freed_memory
from jaxllm.models.describe import Param
from jaxllm.quant.format import QuantizedWeight
from jaxllm.quant.rows import Format, QuantRows, concat_rows, to_weight

_is_param = lambda x: isinstance(x, (nn.Partitioned, QuantizedWeight))


def _param_leaves(boxed, is_leaf=_is_param) -> dict[tuple[str, ...], object]:
    """Flax path -> the param's leaf: its shape description (ShapeDtypeStruct, or a QuantizedWeight of them),
    or whatever `is_leaf` stops at."""
    flat = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=is_leaf)[0]
    out = {}
    for path, leaf in flat:
        key = tuple(p.key for p in path)
        out[key] = nn.unbox(leaf) if isinstance(leaf, QuantizedWeight) else getattr(leaf, "value", leaf)
    return out


def assemble_params(
    cfg: ModelConfig,
    boxed_shapes,
    description: dict[tuple[str, ...], Param],
    read: Callable[[str], np.ndarray],
    dtype,
    read_rows: Callable[[str], QuantRows] | None = None,
    progress: bool = True,
    desc: str = "loading weights",
    shardings=None,
):
    """Build {'params': ...}, every array checked against the model's own shape description.

    boxed_shapes: `jax.eval_shape(model.init)` output; description: the family's params by path;
    read(hf_name) -> float array in Hugging Face layout; read_rows(hf_name) -> QuantRows, needed when the
    model has quantized params; shardings: `sharding.param_shardings` of the shapes (None: the default
    device), each param placed in its own, so that a device receives only its shard.
    """
    shapes = _param_leaves(boxed_shapes)
    placed = _param_leaves(shardings, lambda x: isinstance(x, (NamedSharding, QuantizedWeight))) if shardings else {}
    tree: dict = {}
    np_dtype = jnp.dtype(dtype)
    for path in tqdm(shapes, desc=desc, disable=not progress, unit="tensor"):
        rule, layer = _rule_key(path)
        if rule not in description:
            raise ModelLoadError(f"no loading rule for parameter {'/'.join(path)}")
        p, want = description[rule], shapes[path]
        layers = [layer] if layer is not None else (range(cfg.num_layers) if p.per_layer else [None])
        stacked = p.per_layer and layer is None
        quantized = isinstance(want, QuantizedWeight)
        if quantized and read_rows is None:
            raise ModelLoadError(f"{p.name} is quantized but the source has no quantized reader")
        if quantized:
            fmt = Format(want.kind, want.group, want.offset is not None)
            one = lambda i, p=p, fmt=fmt, want=want: _quantized(p, i, read_rows, cfg, fmt, want)
        else:
            inner = want.shape[1:] if stacked else want.shape
            one = lambda i, p=p, inner=inner: _float(p, i, read, cfg, inner).astype(np_dtype, copy=False)
        where = placed.get(path)
        value = _stack(one, layers, cfg.num_layers, where) if stacked else jax.device_put(one(layers[0]), where)
        release_freed_memory()
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return {"params": tree}


def _stack(one: Callable[[int], object], layers, count: int, where=None):
    """The layers' arrays (pytrees of numpy arrays, from `one(i)`) stacked on the device [count, ...], in the
    sharding `where` (a matching pytree of NamedShardings; None: the default device).

    Each layer is copied into a zeroed device stack in place (the stack is donated), so that the host holds
    one layer at a time, never the whole stack, and each device receives only its shard of it. Float types
    that XLA:CPU emulates (fp8, bfloat16: an update there copies the whole stack, ~200 ms a layer for fp8)
    travel as their bits, reinterpreted once at the end in place."""
    value, put, dtypes = None, _put_layer, None
    for i in layers:
        part = one(i)
        if value is None:
            dtypes = jax.tree.map(lambda a: a.dtype, part)
        part = jax.tree.map(_bits, part)
        if value is None:
            if where is None:
                value = jax.tree.map(lambda a: jnp.zeros((count, *a.shape), a.dtype), part)
            else:
                value = jax.tree.map(lambda a, s: jnp.zeros((count, *a.shape), a.dtype, device=s), part, where)
                put = jax.jit(_update_layer, donate_argnums=0, out_shardings=where)
        if where is not None:
            part = jax.device_put(part, jax.tree.map(_layer_sharding, where))
        value = put(value, part, np.int32(i))
        del part
        release_freed_memory()  # the layer's float temporaries
    return jax.tree.map(_from_bits, value, dtypes)


EMULATED = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.bfloat16))


def _bits(a: np.ndarray) -> np.ndarray:
    """An array of an emulated float type as unsigned integers of its width (a view); others as they are."""
    return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}")) if a.dtype in EMULATED else a


def _from_bits(a: jax.Array, dtype) -> jax.Array:
    return _reinterpret(a, dtype) if a.dtype != dtype else a


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _reinterpret(a, dtype):
    return jax.lax.bitcast_convert_type(a, dtype)


def _layer_sharding(s: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stack sharded as `s`."""
    return NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))


def _update_layer(stack, part, i):
    return jax.tree.map(lambda s, a: jax.lax.dynamic_update_index_in_dim(s, a, i, 0), stack, part)


_put_layer = jax.jit(_update_layer, donate_argnums=0)


def _float(p: Param, layer: int | None, read, cfg: ModelConfig, want) -> np.ndarray:
    """One layer's (or a global) float param: its sources read, concatenated along rows, reordered, laid out."""
    names = p.sources(layer)
    rows = np.concatenate([read(n) for n in names], axis=0) if len(names) > 1 else read(names[0])
    if p.kind != "vector":
        _checked(rows, _torch_shape(p, cfg), names[0])
    if p.rows is not None:
        rows = rows[p.rows(cfg)]
    arr = p.float_layout(rows, cfg)
    if p.kind == "vector" and arr.size == int(np.prod(want)):
        arr = arr.reshape(want)
    return _checked(arr, want, names[0])


def _quantized(p: Param, layer: int | None, read_rows, cfg: ModelConfig, fmt: Format, want) -> QuantizedWeight:
    """One layer's (or a global) quantized param, packed as numpy arrays in `fmt`."""
    names = p.sources(layer)
    rows = concat_rows([read_rows(n) for n in names])
    _checked(rows.values, _torch_shape(p, cfg), names[0])
    if p.rows is not None:
        rows = rows.take(p.rows(cfg))
    try:
        rows = rows.widen(fmt)
    except ValueError as e:
        raise ModelLoadError(f"{names[0]} cannot be stored as {fmt}: {e}") from None
    w = to_weight(rows, tuple(want.in_shape), tuple(want.out_shape), want.axes)
    inner = lambda s: s.shape[-2:]
    for got, exp in ((w.q, want.q), (w.scale, want.scale)):
        _checked(got, inner(exp), names[0])
    return w


def _torch_shape(p: Param, cfg: ModelConfig) -> tuple[int, int]:
    """[N, K]: the shape of a matrix param's concatenated source rows."""
    n = p.source_rows(cfg) if p.source_rows else int(np.prod(p.out_dims(cfg)))
    return n, int(np.prod(p.in_dims(cfg)))


def _rule_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """The description's key of a param path, and its layer for the unrolled layout (`layers_3/...`)."""
    head, _, index = path[0].rpartition("_")
    if head == "layers" and index.isdigit():
        return ("layers",) + path[1:], int(index)
    return path, None


def _checked(arr: np.ndarray, want: tuple[int, ...], name: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(want):
        raise ModelLoadError(f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(want)} from the config")
    return arr
