"""The one matmul seam: every projection of every model goes through `einsum`, float or quantized alike.

A float weight runs `jnp.einsum` as written. A `QuantizedWeight` is a matrix [N, K] whose K runs over the
spec's contracted letters and N over the weight's other letters, both in the order the weight's spec names
them (its logical float layout): x is brought to [M, K], the backend's quantized matmul kernel gives
[M, N], and the result is laid out as the spec asks. Models never unpack quantized data themselves.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.quant.format import QuantizedWeight


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Lora:
    """Low-rank adapters of one weight [K, N] (K over the spec's contracted letters, N over the weight's
    others, each in the weight's own order), one per slot: a [slots, K, rank], b [slots, rank, N] (the
    adapter's scale folded into b), with a leading layer axis when the weight is stacked; ids: the slot of
    each row of x, [x's free letters...] int32 (any other value: no adapter)."""

    a: jax.Array
    b: jax.Array
    ids: jax.Array


def einsum(spec: str, x: jax.Array, w, layer=None, lora: Lora | None = None, **kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, w)` where w may be a `QuantizedWeight` (then the result is float32).

    spec: a two-operand einsum with the weight second, e.g. "btd,dkgh->btkgh"; '...' may lead x's letters.
    layer: with stacked weights [layers, ...], the layer to use ([] int32); a quantized stack goes to the
    kernel whole with the index, so that no layer's weights are copied out first.
    lora: adapters added to w, each row of x through its own slot's ((x a) b) (see `Lora`).
    """
    y = _einsum(spec, x, w, layer, **kwargs)
    return (
        y
        if lora is None
        else y + _lora_delta(spec, x, lora, layer, _kept_shape(spec, x.ndim, w, layer)).astype(y.dtype)
    )


def _kept_shape(spec: str, x_ndim: int, w, layer) -> tuple[int, ...]:
    """The sizes of the weight's letters that the output keeps, in the weight's order."""
    if isinstance(w, QuantizedWeight):
        return tuple(w.out_shape)
    xs, ws, out = _expand(spec, x_ndim)
    shape = w.shape[1:] if layer is not None else w.shape
    return tuple(shape[ws.index(c)] for c in ws if not (c in xs and c not in out))


def _lora_delta(spec: str, x: jax.Array, lora: Lora, layer, kept_shape: tuple[int, ...]) -> jax.Array:
    """The adapters' term of `einsum`: for each row, x [.., K] @ a[slot] @ b[slot], laid out as the spec says.

    What the batch's slots need, decided on device (`lax.switch`): no row with an adapter reads no adapter
    weights; rows of one adapter read that slot's a and b only (its term masked to those rows); rows of
    several adapters compute every slot's x @ a (rank-sized) masked by each row's slot, in one einsum. One
    compiled shape serves any mix of adapters and rows without one."""
    xs, ws, out, contracted, batch, kept = _letters(spec, x.ndim)
    x2 = jnp.transpose(x, [xs.index(c) for c in batch + contracted]).astype(lora.a.dtype)
    lead = x2.shape[: len(batch)]
    x2 = x2.reshape(math.prod(lead), -1)
    slots = lora.a.shape[0 if layer is None else 1]
    pick = jax.nn.one_hot(lora.ids.reshape(-1), slots, dtype=x2.dtype)  # [rows, slots]; no adapter: zeros
    used = jnp.any(pick > 0, axis=0)
    at = lambda w, s: w[s] if layer is None else w[layer, s]
    zero = jnp.zeros((x2.shape[0], lora.b.shape[-1]), x2.dtype)

    def one(_):
        s = jnp.argmax(used)
        return jnp.dot(jnp.dot(x2, at(lora.a, s)) * pick[:, s, None], at(lora.b, s))

    def every(_):
        a, b = (lora.a, lora.b) if layer is None else (lora.a[layer], lora.b[layer])
        return jnp.einsum("msr,srn->mn", jnp.einsum("mk,skr->msr", x2, a) * pick[:, :, None], b)

    y = jax.lax.switch(jnp.minimum(jnp.sum(used), 2), [lambda _: zero, one, every], None)
    y = y.reshape(*lead, *kept_shape)
    return jnp.transpose(y, [(batch + kept).index(c) for c in out])


def _einsum(spec: str, x: jax.Array, w, layer=None, **kwargs) -> jax.Array:
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(spec, x, w if layer is None else w[layer], **kwargs)
    xs, ws, out, contracted, batch, kept = _letters(spec, x.ndim)
    if sorted(batch + kept) != sorted(out) or len(set(xs)) != len(xs):
        raise ValueError(f"quantized einsum {spec!r}: the output must hold x's free letters and the weight's")
    sizes = dict(zip(xs, x.shape, strict=True))
    if tuple(sizes[c] for c in contracted) != tuple(w.in_shape):
        raise ValueError(f"quantized einsum {spec!r}: x contracts {[sizes[c] for c in contracted]}, w {w.in_shape}")
    x2 = jnp.transpose(x, [xs.index(c) for c in batch + contracted])
    lead = x2.shape[: len(batch)]
    y = _differentiable_qmatmul(x2.reshape(math.prod(lead), w.k), w, layer).reshape(*lead, *w.out_shape)
    return jnp.transpose(y, [(batch + kept).index(c) for c in out])


@jax.custom_vjp
def _differentiable_qmatmul(x: jax.Array, w: QuantizedWeight, layer) -> jax.Array:
    """`_qmatmul` with a gradient for x (the kernels have none of their own): x [M, K] -> [M, N] float32.
    The gradient flows through the dequantized weight, g [M, N] @ w [N, K]; the stored quantized values get
    none (they are fixed: train adapters or float params around them)."""
    return _qmatmul(x, w, layer)


def _qmatmul_fwd(x, w, layer):
    return _qmatmul(x, w, layer), (jnp.zeros((0,), x.dtype), w, layer)


def _qmatmul_bwd(saved, g):
    x_dtype, w, layer = saved
    own = w if layer is None else jax.tree.map(lambda a: a[layer], w)
    dx = jnp.dot(g, own.dequantize(jnp.float32), preferred_element_type=jnp.float32).astype(x_dtype.dtype)
    return dx, jax.tree.map(_no_gradient, w), jax.tree.map(_no_gradient, layer)


def _no_gradient(a):
    a = jnp.asarray(a)
    return jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0)


_differentiable_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _qmatmul(x: jax.Array, w: QuantizedWeight, layer) -> jax.Array:
    """x [M, K] times w [N, K] transposed -> [M, N] float32 by the backend's kernel; under a placement, the
    kernel runs per shard (XLA cannot split a custom call): N split, each device computes its columns;
    K split, each device its partial sums, added over the devices; M split over the data-parallel replicas
    where they share it evenly, each replica its rows."""
    from jaxllm import sharding
    from jaxllm.kernels.qmatmul import qmatmul

    placement = sharding.active()
    if placement is None or placement.mesh.size == 1:
        return qmatmul(x, w, layer)
    n_ax, k_ax = sharding.quantized_axes(w, placement)
    rows = sharding.rows_axis(placement, x.shape[0])
    per_channel = w.scale.shape[-1] == 1

    def local(x, w, layer):
        k = x.shape[1]
        shard = dataclasses.replace(w, in_shape=(k,), out_shape=(w.q.shape[-2],), group=k if per_channel else w.group)
        y = qmatmul(x, shard, layer)
        return jax.lax.psum(y, k_ax) if k_ax else y

    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    w_in = w if w.q.ndim == 3 else jax.tree.map(lambda a: a[None], w)  # a stack of one: one call shape
    specs = sharding.quantized_specs(w_in, placement)
    run = jax.shard_map(
        local,
        mesh=placement.mesh,
        in_specs=(P(rows, k_ax), specs, P()),
        out_specs=P(rows, n_ax),
        check_vma=False,
    )
    return run(x, w_in, layer)


def take(w, ids: jax.Array) -> jax.Array:
    """Rows of an embedding table [N, K] at integer `ids` [...] -> [..., K] float (dequantized if need be)."""
    if not isinstance(w, QuantizedWeight):
        return jnp.take(w, ids, axis=0)
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), w)
    return rows.dequantize(jnp.float32)


def _letters(spec: str, x_ndim: int):
    """(x's letters, the weight's, the output's, the contracted ones, x's free ones, the weight's kept ones)."""
    xs, ws, out = _expand(spec, x_ndim)
    contracted = [c for c in ws if c in xs and c not in out]
    return xs, ws, out, contracted, [c for c in xs if c not in contracted], [c for c in ws if c not in contracted]


def _expand(spec: str, x_ndim: int) -> tuple[str, str, str]:
    """Split 'xs,ws->out' and replace a leading '...' in x and out by unused letters."""
    lhs, out = spec.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    if "..." in xs:
        free = [c for c in string.ascii_letters if c not in spec]
        n = x_ndim - (len(xs) - 3)
        fill = "".join(free[:n])
        xs, out = xs.replace("...", fill), out.replace("...", fill)
    return xs, ws, out
