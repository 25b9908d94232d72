"""Quantized matmul in Pallas (Triton lowering): x [M, K] times a `QuantizedWeight` [N, K] transposed.

Grid (M blocks, N blocks, K splits); M varies fastest, so the programs reading one weight strip run side
by side and share it through L2. A program walks its share of K one `block_k` tile at a time: it loads
the quantized bytes of its [block_n, block_k] weight tile and their scales (and offsets) straight from the
stored arrays, dequantizes them in registers into x's dtype and accumulates one `dot` in float32. The
weights therefore cross HBM at 1 (int8, fp8) or 1/2 (uint4) byte per value, plus 4 (or 8) bytes per group.

uint4 holds element 2j in a byte's low nibble and 2j + 1 in its high one. Rather than interleaving the
nibbles back into K order, the kernel reads x's even and odd columns of the tile (two strided loads) and
takes two dots: x[:, 0::2] @ low.T + x[:, 1::2] @ high.T.

Scales: a tile spans either whole groups (group <= block_k: [block_n, block_k // group] scales, each
broadcast over its group) or a part of one group (group > block_k, per-channel included: one column).

Stacked weights [L, N, ...] are passed whole with the layer as a one-element int32 operand that the
kernel indexes with (Triton has no scalar prefetch, so the index map cannot read it): no slice of the
stack is ever copied. Padding done by the wrapper: x's rows, to a multiple of block_m (decode's single
row becomes 16, the smallest `dot` Triton takes). N and K are never padded: block_n and block_k shrink
until they divide them, and shapes that leave blocks Triton cannot take raise ValueError while tracing,
so that a dispatcher can fall back to the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.attention._common import check_triton_dims
from jaxllm.kernels.qmatmul.tuning import QMatmulBlockSizes, default_block_sizes, num_split_k
from jaxllm.quant.format import KINDS, QuantizedWeight, stored_k


def _expand(v, width: int):
    """Per-group values [block_n, groups] -> [block_n, width], each repeated over its width // groups columns."""
    rows, groups = v.shape
    if groups == 1:
        return v  # broadcasts against the tile
    return jnp.broadcast_to(v[:, :, None], (rows, groups, width // groups)).reshape(rows, width)


def _qmatmul_kernel(
    layer_ref,  # [1] int32: the layer of the stack to read
    x_ref,  # [block_m, K]: rows of x (bf16 or f32)
    q_ref,  # [L, block_n, Kq]: quantized values of the whole stack (Kq = K, or K // 2 for uint4)
    s_ref,  # [L, block_n, K // group] f32: scales
    *refs,  # (o_ref,) or (off_ref [L, block_n, K // group] f32, o_ref)
    kind: str,
    group: int,
    block_k: int,
    tiles_per_split: int,
    precision,
):
    o_ref = refs[-1]  # [block_m, block_n] f32: this split's partial product
    off_ref = refs[0] if len(refs) == 2 else None
    layer = layer_ref[0]
    packed = kind == "uint4"
    width = block_k // 2 if packed else block_k  # quantized columns per tile
    groups = max(1, block_k // group)  # scale columns per tile
    block_m, block_n = o_ref.shape
    dtype = x_ref.dtype

    def dequant(vals, s, off):
        w = vals.astype(jnp.float32) * s
        return (w if off is None else w + off).astype(dtype)

    def body(t, acc):
        g0 = t * groups if group <= block_k else lax.div(t, group // block_k)
        s = _expand(s_ref[layer, :, pl.ds(g0, groups)], width)
        off = None if off_ref is None else _expand(off_ref[layer, :, pl.ds(g0, groups)], width)
        q = q_ref[layer, :, pl.ds(t * width, width)]  # [block_n, width]
        if not packed:
            x = x_ref[:, pl.ds(t * block_k, block_k)]
            return acc + plgpu.dot(x, dequant(q, s, off), trans_b=True, precision=precision)
        x_even = x_ref[:, pl.ds(t * block_k, width, stride=2)]
        x_odd = x_ref[:, pl.ds(t * block_k + 1, width, stride=2)]
        acc += plgpu.dot(x_even, dequant(q & 0xF, s, off), trans_b=True, precision=precision)
        return acc + plgpu.dot(x_odd, dequant(q >> 4, s, off), trans_b=True, precision=precision)

    first = pl.program_id(2) * tiles_per_split
    acc = jnp.zeros((block_m, block_n), jnp.float32)
    o_ref[...] = lax.fori_loop(first, first + tiles_per_split, body, acc)


def _fit(limit: int, size: int, ok=lambda b: True) -> int:
    """The largest power of two <= limit that divides `size` and passes `ok` (1 at worst)."""
    b = 1 << (max(1, limit).bit_length() - 1)
    while b > 1 and (size % b or not ok(b)):
        b //= 2
    return b


def _plan(m: int, n: int, k: int, kind: str, group: int, bs: QMatmulBlockSizes, interpret: bool):
    """(block_m, block_n, block_k, split_k) for this shape: `bs` shrunk to divide N and K and to fit the group.

    Raises ValueError for what the Triton lowering cannot take (unless interpreting).
    """
    packed = kind == "uint4"
    block_n = _fit(bs.block_n, n)
    block_k = _fit(bs.block_k, k, lambda b: (group % b == 0 or b % group == 0) and (b % 2 == 0 or not packed))
    if packed and block_k % 2:
        raise ValueError(f"uint4 with K={k}, group={group}: no even block_k divides both")
    check_triton_dims(interpret, block_m=bs.block_m, block_n=block_n, dot_k=block_k // 2 if packed else block_k)
    k_tiles = k // block_k
    split = bs.split_k or num_split_k(-(-m // bs.block_m) * (n // block_n), k_tiles)
    if k_tiles % split:
        raise ValueError(f"split_k={split} does not divide the {k_tiles} K tiles of block_k={block_k}")
    return bs.block_m, block_n, block_k, split


def _check_weight(x, w: QuantizedWeight, layer) -> None:
    if w.kind not in KINDS:
        raise ValueError(f"unknown quantization kind {w.kind!r}")
    stacked = 3 if layer is not None else 2
    n, k = w.n, w.k
    kq = stored_k(w.kind, k)
    if w.q.ndim != stacked or w.q.shape[-2:] != (n, kq):
        raise ValueError(f"pallas_qmatmul takes q [{'L, ' if layer is not None else ''}N, K'], got {w.q.shape}")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x {x.shape} does not match the weight's K={k}")
    if k % w.group or (w.kind == "uint4" and w.group % 2):
        raise ValueError(f"group={w.group} does not tile K={k} (uint4 needs an even group)")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def pallas_qmatmul(
    x: jax.Array,
    w: QuantizedWeight,
    layer=None,
    *,
    block_sizes: QMatmulBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] (bf16 or f32) times the quantized w [N, K] transposed -> [M, N] float32.

    w: one matrix (q [N, K'], scale/offset [N, K // group]), or a stack ([L, ...] each) read at `layer`
    ([] int32); block_sizes: tiles (None: `tuning.default_block_sizes(M)`); interpret: run the kernel in
    the Pallas interpreter (the only way on the CPU). The weight is dequantized to x's dtype inside the
    kernel (f32 x: full-precision dots); accumulation is in float32.
    """
    _check_weight(x, w, layer)
    m, k = x.shape
    n = w.n
    bs = block_sizes or default_block_sizes(m)
    block_m, block_n, block_k, split = _plan(m, n, k, w.kind, w.group, bs, interpret)
    m_pad = -(-m // block_m) * block_m
    k_tiles = k // block_k

    q, scale, offset = w.q, w.scale, w.offset
    if layer is None:  # a free reshape: the kernel always reads a stack
        q, scale = q[None], scale[None]
        offset = None if offset is None else offset[None]
        layer = 0
    n_layers = q.shape[0]
    layer = jnp.asarray(layer, jnp.int32)
    # Indexed like the reference's a[layer] (negative from the end, clamped), never out of the stack.
    layer = jnp.clip(jnp.where(layer < 0, layer + n_layers, layer), 0, n_layers - 1).reshape(1)
    xp = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
    if xp.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        xp = xp.astype(jnp.float32)
    kq, n_groups = q.shape[2], scale.shape[2]

    kernel = functools.partial(
        _qmatmul_kernel,
        kind=w.kind,
        group=w.group,
        block_k=block_k,
        tiles_per_split=k_tiles // split,
        precision=lax.Precision.HIGHEST if xp.dtype == jnp.float32 else None,
    )
    group_spec = pl.BlockSpec((n_layers, block_n, n_groups), lambda i, j, s: (0, j, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda i, j, s: (0,)),
        pl.BlockSpec((block_m, k), lambda i, j, s: (i, 0)),
        pl.BlockSpec((n_layers, block_n, kq), lambda i, j, s: (0, j, 0)),
        group_spec,
    ]
    operands = [layer, xp, q, scale]
    if offset is not None:
        in_specs.append(group_spec)
        operands.append(offset)
    partial = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n // block_n, split),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, m_pad, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"qmatmul_{w.kind}",
    )(*operands)
    out = partial[0] if split == 1 else partial.sum(axis=0)
    return out[:m]
