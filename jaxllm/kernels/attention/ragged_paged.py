"""Ragged paged attention in Pallas (Triton lowering): a flat run of new tokens from sequences of any query
length (decodes and prefill chunks together) against each sequence's paged context.

The wrapper cuts each sequence's new tokens into query blocks of `block_q` (a sequence of n tokens takes
ceil(n / block_q) blocks; at most tokens / block_q + seqs in all, a static bound) and gathers them into
[blocks, block_q, heads, head_dim]. Grid (query blocks, q_heads): a program holds one block of one head and
keeps an online softmax over (1) its sequence's cached context, page by page through the block table, up to
the sequence's length only, then (2) the sequence's own new keys, causally, read at the sequence's offset
in the flat run. As in the flash prefill kernel, key blocks no query can see are never visited and blocks
that every query sees skip the masking. The outputs go back to their tokens; padding tokens get zeros.

A decode takes one block of which one row is real: the context read, which dominates decode, is the same as
the decode kernel's, and the wasted rows cost arithmetic only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.attention._common import (
    attend_context,
    check_power_of_2,
    check_triton_dims,
    key_ranges,
    prepare_tables,
    softmax_step,
    visit_ranges,
)
from jaxllm.kernels.attention.reference import NEG_INF
from jaxllm.kernels.attention.tuning import DEFAULT_PREFILL, PrefillBlockSizes, next_power_of_2


def _ragged_kernel(
    q_ref,  # [block_q, head_dim]: this block's queries of one head
    kn_ref,  # [tokens_pad, head_dim]: the flat run's new keys of this kv head
    vn_ref,  # [tokens_pad, head_dim]
    kp_ref,  # [num_pages, page_size, head_dim]: this kv head's slice of the pool
    vp_ref,  # [num_pages, page_size, head_dim]
    tables_ref,  # [n_table] int32: clamped page ids of the block's sequence
    start_ref,  # [1] int32: the sequence's first token in the flat run
    first_ref,  # [1] int32: the block's first query, counted from the sequence's first new token
    qlen_ref,  # [1] int32: the sequence's new tokens (0: a padding block)
    len_ref,  # [1] int32: the sequence's cached positions
    o_ref,  # [block_q, head_dim]
    *,
    scale: float,
    block_k: int,
    pages_per_block: int,
    sliding_window: int | None,
):
    window = sliding_window or 0
    start, q_first, q_len, ctx_len = start_ref[0], first_ref[0], qlen_ref[0], len_ref[0]
    q = q_ref[...]
    block_q, head_dim = q.shape
    t_q = q_first + jnp.arange(block_q)  # the queries' indices among the sequence's new tokens
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), NEG_INF, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )

    kw = dict(pages_per_block=pages_per_block, window=window, scale=scale)
    carry = attend_context(carry, q, q_first, ctx_len, kp_ref, vp_ref, tables_ref, **kw)

    def new_body(j, carry, masked):
        k = kn_ref[pl.ds(start + j * block_k, block_k), :]
        v = vn_ref[pl.ds(start + j * block_k, block_k), :]
        if not masked:
            return softmax_step(carry, q, k, v, scale)
        t_k = j * block_k + jnp.arange(block_k)
        mine = t_k < q_len  # keys past the sequence's tokens belong to the next sequence
        v = jnp.where(mine[:, None], v, 0)
        mask = (t_k[None, :] <= t_q[:, None]) & mine[None, :]
        if window:
            mask = mask & (t_q[:, None] - t_k[None, :] < window)
        return softmax_step(carry, q, k, v, scale, mask)

    hi = jnp.minimum(q_first + block_q, q_len)
    lo = jnp.minimum(jnp.maximum(q_first - window + 1, 0), hi) if window else 0
    full_lo = jnp.maximum(q_first + block_q - window, 0) if window else 0
    full_hi = jnp.minimum(q_first + 1, q_len)  # keys that every query of the block sees, causally
    acc, _, denom = visit_ranges(new_body, key_ranges(lo, hi, full_lo, full_hi, block_k), carry)
    denom = jnp.where(denom == 0.0, 1.0, denom)  # padding queries see no key
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_sizes", "interpret"))
def pallas_ragged_paged_attention(
    q,
    k_new,
    v_new,
    k_pages,
    v_pages,
    block_tables,
    ctx_lens,
    q_starts,
    q_lens,
    seq_ids,
    sliding_window: int | None = None,
    *,
    block_sizes: PrefillBlockSizes | None = None,
    interpret: bool = False,
):
    """Attention output [tokens, q_heads, head_dim] (q's dtype) for ragged new tokens.

    q: [tokens, q_heads, head_dim]; k_new, v_new: [tokens, kv_heads, head_dim]; k_pages, v_pages: one layer's
    pool [num_pages, page_size, kv_heads, head_dim]; block_tables: [seqs, n_pages] int32 (out-of-range ids
    are padding); ctx_lens, q_starts, q_lens: [seqs] int32 (cached positions, first new token in the run, new
    tokens; a sequence's tokens are contiguous); seq_ids: [tokens] int32 (out of range: padding, output
    zero). Token j of sequence s sits at position ctx_lens[s] + j and sees the cached positions (within
    `sliding_window`, when given) and its sequence's new tokens 0..j. block_sizes: tiles (None:
    `tuning.DEFAULT_PREFILL`, block_q shrunk to the run); interpret: the Pallas interpreter (the CPU's only
    way). Accumulates in float32.
    """
    t, h, d = q.shape
    kvh = k_new.shape[1]
    if h % kvh:
        raise ValueError(f"q_heads={h} is not a multiple of kv_heads={kvh}")
    group = h // kvh
    n_seqs = block_tables.shape[0]
    num_pages, page_size = k_pages.shape[:2]
    bs = block_sizes or DEFAULT_PREFILL
    block_q = min(bs.block_q, max(16, next_power_of_2(t)))
    block_k = min(bs.block_k, max(16, next_power_of_2(t)))
    pages_per_block = max(1, bs.block_k // page_size)
    check_triton_dims(interpret, head_dim=d, block_q=block_q, block_k=block_k)
    check_power_of_2(interpret, page_size=page_size)
    check_triton_dims(interpret, context_block=pages_per_block * page_size)

    # Query blocks: sequence s owns blocks [first_block[s], first_block[s] + ceil(q_lens[s] / block_q)).
    n_blocks = -(-t // block_q) + n_seqs
    q_lens = jnp.clip(q_lens.astype(jnp.int32), 0, t)
    per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(per_seq)
    first_block = ends - per_seq
    blocks = jnp.arange(n_blocks, dtype=jnp.int32)
    owner = jnp.searchsorted(ends, blocks, side="right").astype(jnp.int32)  # n_seqs past the last
    real = owner < n_seqs
    s = jnp.minimum(owner, n_seqs - 1)
    starts = jnp.where(real, q_starts[s], 0).astype(jnp.int32)
    firsts = jnp.where(real, (blocks - first_block[s]) * block_q, 0)
    lens = jnp.where(real, q_lens[s], 0)
    ctx_lens = jnp.where(real, ctx_lens[s], 0)
    tables, ctx = prepare_tables(block_tables[s], ctx_lens, num_pages, page_size, pages_per_block)

    rows = jnp.clip(starts[:, None] + firsts[:, None] + jnp.arange(block_q)[None], 0, t - 1)  # [blocks, block_q]
    q_blocks = q[rows]
    pad = ((0, block_k), (0, 0), (0, 0))  # the last sequence's key blocks may reach past the run
    kn, vn = jnp.pad(k_new, pad), jnp.pad(v_new, pad)
    t_pad = t + block_k

    scalar = pl.BlockSpec((None, 1), lambda i, k: (i, 0))
    page_spec = pl.BlockSpec((num_pages, page_size, None, d), lambda i, k: (0, 0, lax.div(k, group), 0))
    new_spec = pl.BlockSpec((t_pad, None, d), lambda i, k: (0, lax.div(k, group), 0))
    kernel = functools.partial(
        _ragged_kernel,
        scale=1.0 / float(d) ** 0.5,
        block_k=block_k,
        pages_per_block=pages_per_block,
        sliding_window=sliding_window or None,
    )
    out = pl.pallas_call(
        kernel,
        grid=(n_blocks, h),
        in_specs=[
            pl.BlockSpec((None, block_q, None, d), lambda i, k: (i, 0, k, 0)),
            new_spec,
            new_spec,
            page_spec,
            page_spec,
            pl.BlockSpec((None, tables.shape[1]), lambda i, k: (i, 0)),
            scalar,
            scalar,
            scalar,
            scalar,
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, k: (i, 0, k, 0)),
        out_shape=jax.ShapeDtypeStruct((n_blocks, block_q, h, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(q_blocks, kn, vn, k_pages, v_pages, tables, starts[:, None], firsts[:, None], lens[:, None], ctx)

    # Each token's output: its sequence's block and row.
    seq = jnp.clip(seq_ids, 0, n_seqs - 1)
    offset = jnp.arange(t, dtype=jnp.int32) - q_starts[seq]
    valid = (seq_ids >= 0) & (seq_ids < n_seqs) & (offset >= 0) & (offset < q_lens[seq])
    offset = jnp.clip(offset, 0, t - 1)
    picked = out[jnp.clip(first_block[seq] + offset // block_q, 0, n_blocks - 1), offset % block_q]
    return jnp.where(valid[:, None, None], picked, 0).astype(q.dtype)
