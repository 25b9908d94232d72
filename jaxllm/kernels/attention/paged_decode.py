"""Paged decode attention in Pallas (Triton lowering): one new token per row against its paged context.

Grid (batch, kv_heads, num_splits). One program holds the query heads of one kv group and walks an
equal share of its row's context, one compute block (`pages_per_block` pages) at a time: it reads the
page ids from the block table, gathers those pages straight from the pool (the wrapper never builds a
contiguous copy of the context) and folds them into an online softmax. Split 0 seeds its running max
and sum with the new token's own key, which every query sees, so the new token is merged exactly once
and never needs the cache. The splits' partial results are merged in the wrapper through their maxima.

Padding done by the wrapper, not the kernel: the query group is padded with zero heads to a power of two
>= 16 (Triton's `dot` needs at least 16 rows; SmolLM2's group of 3 and Llama-3's group of 4 both
become 16), and the block table is clamped into range and padded to whole compute blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.attention._common import (
    cdiv,
    check_power_of_2,
    check_triton_dims,
    gather_block,
    prepare_tables,
    softmax_step,
)
from jaxllm.kernels.attention.reference import NEG_INF
from jaxllm.kernels.attention.tuning import DEFAULT_DECODE, DecodeBlockSizes, decode_num_splits, next_power_of_2


def _decode_kernel(
    q_ref,  # [group_pad, head_dim]
    kn_ref,  # [head_dim]: the new token's key
    vn_ref,  # [head_dim]: the new token's value
    kp_ref,  # [num_pages, page_size, head_dim]: this kv head's slice of the pool
    vp_ref,  # [num_pages, page_size, head_dim]
    tables_ref,  # [n_blocks * pages_per_block] int32, clamped page ids of this row
    len_ref,  # [1] int32: valid cached positions of this row
    o_ref,  # [group_pad, head_dim] f32: unnormalized output of this split
    m_ref,  # [group_pad] f32: running max of this split
    denom_ref,  # [group_pad] f32: running sum of this split
    *,
    scale: float,
    pages_per_block: int,
    num_splits: int,
    sliding_window: int | None,
):
    split = pl.program_id(2)
    block_k = pages_per_block * kp_ref.shape[1]
    ctx_len = len_ref[0]
    q = q_ref[...]
    rows, head_dim = q.shape

    # The new token sits at position ctx_len; with a window it sees cached positions > ctx_len - window.
    lo_pos = jnp.maximum(ctx_len - sliding_window + 1, 0) if sliding_window else 0
    first, last = lax.div(lo_pos, block_k), cdiv(ctx_len, block_k)
    per_split = cdiv(jnp.maximum(last - first, 0), num_splits)
    start = first + split * per_split
    end = jnp.minimum(last, start + per_split)

    is_first = split == 0
    s_new = jnp.sum(q.astype(jnp.float32) * kn_ref[...].astype(jnp.float32)[None, :], axis=1) * scale
    m = jnp.where(is_first, s_new, NEG_INF)
    denom = jnp.where(is_first, jnp.ones((rows,), jnp.float32), 0.0)
    v_new = jnp.broadcast_to(vn_ref[...].astype(jnp.float32)[None, :], (rows, head_dim))
    acc = jnp.where(is_first, v_new, 0.0)

    def body(i, carry):
        k = gather_block(kp_ref, tables_ref, i, pages_per_block)
        v = gather_block(vp_ref, tables_ref, i, pages_per_block)
        pos = i * block_k + jnp.arange(block_k)
        valid = pos < ctx_len
        if sliding_window:
            valid = valid & (pos >= lo_pos)
        v = jnp.where(valid[:, None], v, 0)  # slots past ctx_len may hold stale data, NaN included
        return softmax_step(carry, q, k, v, scale, valid[None, :])

    acc, m, denom = lax.fori_loop(start, end, body, (acc, m, denom))
    o_ref[...] = acc
    m_ref[...] = m
    denom_ref[...] = denom


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_sizes", "interpret"))
def paged_decode_attention(
    q,
    k_new,
    v_new,
    k_pages,
    v_pages,
    block_tables,
    ctx_lens,
    sliding_window: int | None = None,
    *,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool = False,
):
    """Attention output [batch, 1, q_heads, head_dim] (q's dtype) of one new token per row.

    q: [batch, 1, q_heads, head_dim]; k_new, v_new: [batch, 1, kv_heads, head_dim], the new token's key
    and value (position ctx_lens[b]); k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], one
    layer's page pool, or None for no cached context; block_tables: [batch, n_pages] int32, the pages
    holding positions [0, n_pages * page_size) of each row (out-of-range ids are padding, clamped);
    ctx_lens: [batch] int32 valid cached positions per row; sliding_window: keys at positions
    > position - window are seen (None or 0: all); block_sizes: tiles (None: `tuning.DEFAULT_DECODE`);
    interpret: run the kernel in the Pallas interpreter (the only way on the CPU).
    q_heads must be a multiple of kv_heads. Accumulates in float32.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    if t != 1:
        raise ValueError(f"paged_decode_attention takes one new token per row, got seq={t}")
    if h % kvh:
        raise ValueError(f"q_heads={h} is not a multiple of kv_heads={kvh}")
    group = h // kvh
    if k_pages is None:  # the only key is the token's own: softmax weight 1
        return jnp.repeat(v_new, group, axis=2).astype(q.dtype)

    bs = block_sizes or DEFAULT_DECODE
    num_pages, page_size = k_pages.shape[:2]
    ppb = bs.pages_per_block
    group_pad = max(16, next_power_of_2(group))
    check_power_of_2(interpret, pages_per_block=ppb, page_size=page_size)
    check_triton_dims(interpret, head_dim=d, block_keys=ppb * page_size)

    tables, lens = prepare_tables(block_tables, ctx_lens, num_pages, page_size, ppb)
    n_table = tables.shape[1]
    splits = bs.num_splits or decode_num_splits(b, kvh, n_table // ppb)
    qg = jnp.pad(q.reshape(b, kvh, group, d), ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    kn, vn = k_new.reshape(b, kvh, d), v_new.reshape(b, kvh, d)

    kernel = functools.partial(
        _decode_kernel,
        scale=1.0 / float(d) ** 0.5,
        pages_per_block=ppb,
        num_splits=splits,
        sliding_window=sliding_window or None,
    )
    page_spec = pl.BlockSpec((num_pages, page_size, None, d), lambda i, j, s: (0, 0, j, 0))
    o, m, denom = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((None, None, group_pad, d), lambda i, j, s: (i, j, 0, 0)),
            pl.BlockSpec((None, None, d), lambda i, j, s: (i, j, 0)),
            pl.BlockSpec((None, None, d), lambda i, j, s: (i, j, 0)),
            page_spec,
            page_spec,
            pl.BlockSpec((None, n_table), lambda i, j, s: (i, 0)),
            pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group_pad, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kvh, splits, group_pad, d), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, splits, group_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, splits, group_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(qg, kn, vn, k_pages, v_pages, tables, lens)

    # Split 0 always holds the new token, so the maximum is finite and empty splits weigh exp(-huge) = 0.
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))
    out = (o * weight[..., None]).sum(axis=2) / (denom * weight).sum(axis=2)[..., None]
    return out[:, :, :group].reshape(b, 1, h, d).astype(q.dtype)
