"""Flash prefill attention in Pallas (Triton lowering): causal attention over new tokens, plus their paged context.

Grid (query blocks, batch, q_heads); a program owns `block_q` new tokens of one query head and keeps an
online softmax over (1) the row's cached context, when there is one (chunked prefill), read page by page
through the block table, then (2) the new tokens' own keys, causally. Key blocks that no query of the
program can see (past the diagonal, before the sliding window, past the context) are never visited, and
blocks that every query sees in full skip the masking, so only the edge blocks pay for it.

Padding done by the wrapper: the new tokens are padded with zeros to whole query/key blocks (their
outputs are dropped), the block table is clamped into range and padded to whole compute blocks.
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


def _prefill_kernel(q_ref, kn_ref, vn_ref, *refs, scale, seq_len, block_k, pages_per_block, sliding_window, has_ctx):
    # q_ref [block_q, head_dim]; kn_ref, vn_ref [seq_pad, head_dim] (this kv head's new keys/values);
    # refs: (kp_ref, vp_ref [num_pages, page_size, head_dim], tables_ref [n_table] int32, len_ref [1] int32)
    # when has_ctx, then o_ref [block_q, head_dim].
    o_ref = refs[-1]
    window = sliding_window or 0
    qi = pl.program_id(0)
    q = q_ref[...]
    block_q, head_dim = q.shape
    q_first = qi * block_q  # new-token index of the program's first query
    t_q = q_first + jnp.arange(block_q)

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), NEG_INF, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )

    if has_ctx:
        kp_ref, vp_ref, tables_ref, len_ref = refs[:4]
        kw = dict(pages_per_block=pages_per_block, window=window, scale=scale)
        carry = attend_context(carry, q, q_first, len_ref[0], kp_ref, vp_ref, tables_ref, **kw)

    def new_body(j, carry, masked):
        k = kn_ref[pl.ds(j * block_k, block_k), :]
        v = vn_ref[pl.ds(j * block_k, block_k), :]
        if not masked:
            return softmax_step(carry, q, k, v, scale)
        t_k = j * block_k + jnp.arange(block_k)
        mask = t_k[None, :] <= t_q[:, None]
        if window:
            mask = mask & (t_q[:, None] - t_k[None, :] < window)
        return softmax_step(carry, q, k, v, scale, mask)

    lo = jnp.maximum(q_first - window + 1, 0) if window else 0
    full_lo = jnp.maximum(q_first + block_q - window, 0) if window else 0
    hi = jnp.minimum(q_first + block_q, seq_len)
    acc, _, denom = visit_ranges(new_body, key_ranges(lo, hi, full_lo, q_first + 1, block_k), carry)
    denom = jnp.where(denom == 0.0, 1.0, denom)  # only padding queries past a window's reach see no key
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_sizes", "interpret"))
def flash_prefill_attention(
    q,
    k_new,
    v_new,
    k_pages,
    v_pages,
    block_tables,
    ctx_lens,
    sliding_window: int | None = None,
    *,
    block_sizes: PrefillBlockSizes | None = None,
    interpret: bool = False,
):
    """Attention output [batch, seq, q_heads, head_dim] (q's dtype) of `seq` new tokens per row.

    q: [batch, seq, q_heads, head_dim]; k_new, v_new: [batch, seq, kv_heads, head_dim], the keys and values
    of the same new tokens (token t of row b sits at position ctx_lens[b] + t and sees tokens 0..t);
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], one layer's page pool, or None for no
    cached context (then block_tables and ctx_lens are ignored and may be None); block_tables:
    [batch, n_pages] int32, the pages holding positions [0, n_pages * page_size) of each row
    (out-of-range ids are padding, clamped); ctx_lens: [batch] int32 valid cached positions per row;
    sliding_window: a query at position p sees keys at positions > p - window (None or 0: all);
    block_sizes: tiles (None: `tuning.DEFAULT_PREFILL`); interpret: run the kernel in the Pallas
    interpreter (the only way on the CPU). q_heads must be a multiple of kv_heads. Accumulates in float32.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    if h % kvh:
        raise ValueError(f"q_heads={h} is not a multiple of kv_heads={kvh}")
    group = h // kvh
    bs = block_sizes or DEFAULT_PREFILL
    # Short prompts get smaller tiles (never below the 16 rows a Triton dot needs).
    block_q = min(bs.block_q, max(16, next_power_of_2(t)))
    block_k = min(bs.block_k, max(16, next_power_of_2(t)))
    check_triton_dims(interpret, head_dim=d, block_q=block_q, block_k=block_k)
    seq_pad = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    pad = ((0, 0), (0, seq_pad - t), (0, 0), (0, 0))
    q_p, k_p, v_p = jnp.pad(q, pad), jnp.pad(k_new, pad), jnp.pad(v_new, pad)

    has_ctx = k_pages is not None
    operands = [q_p, k_p, v_p]
    in_specs = [
        pl.BlockSpec((None, block_q, None, d), lambda i, j, k: (j, i, k, 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, j, k: (j, 0, lax.div(k, group), 0)),
        pl.BlockSpec((None, seq_pad, None, d), lambda i, j, k: (j, 0, lax.div(k, group), 0)),
    ]
    pages_per_block = 1
    if has_ctx:
        num_pages, page_size = k_pages.shape[:2]
        pages_per_block = max(1, bs.block_k // page_size)
        check_power_of_2(interpret, page_size=page_size)
        check_triton_dims(interpret, context_block=pages_per_block * page_size)
        tables, lens = prepare_tables(block_tables, ctx_lens, num_pages, page_size, pages_per_block)
        page_spec = pl.BlockSpec((num_pages, page_size, None, d), lambda i, j, k: (0, 0, lax.div(k, group), 0))
        operands += [k_pages, v_pages, tables, lens]
        in_specs += [
            page_spec,
            page_spec,
            pl.BlockSpec((None, tables.shape[1]), lambda i, j, k: (j, 0)),
            pl.BlockSpec((None, 1), lambda i, j, k: (j, 0)),
        ]

    kernel = functools.partial(
        _prefill_kernel,
        scale=1.0 / float(d) ** 0.5,
        seq_len=t,
        block_k=block_k,
        pages_per_block=pages_per_block,
        sliding_window=sliding_window or None,
        has_ctx=has_ctx,
    )
    out = pl.pallas_call(
        kernel,
        grid=(-(-t // block_q), b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, j, k: (j, i, k, 0)),
        out_shape=jax.ShapeDtypeStruct((b, seq_pad, h, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="flash_prefill_attention",
    )(*operands)
    return out[:, :t]
