"""Pieces shared by the Pallas attention kernels: the online-softmax step, the paged gather, shape checks.

Written for the Triton lowering of Pallas: every array a kernel builds has power-of-two dimensions,
integer division goes through `lax.div` on non-negative values, and each ref is indexed once.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.attention.reference import NEG_INF


def cdiv(a, b: int):
    """Ceil division of a non-negative traced int32 by a Python int (`//` on traced ints trips Triton)."""
    return lax.div(a + (b - 1), b)


def softmax_step(carry, q, k, v, scale: float, mask=None):
    """Fold one block of keys into the running softmax state.

    carry: (acc [rows, head_dim] f32, m [rows] f32 running max, denom [rows] f32 running sum);
    q: [rows, head_dim]; k, v: [cols, head_dim]; mask: bool [rows or 1, cols], None = all visible.
    Masked probabilities are exactly zero (not exp(NEG_INF - NEG_INF) = 1), so a row that has seen
    no visible key yet keeps denom == 0 and contributes nothing when it is merged later.
    """
    acc, m, denom = carry
    s = plgpu.dot(q, k, trans_b=True) * scale  # [rows, cols] f32
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, denom * alpha + p.sum(axis=1)


def gather_block(pages_ref, tables_ref, block: int, pages_per_block: int):
    """Keys or values of compute block `block`: [pages_per_block * page_size, head_dim].

    pages_ref: [num_pages, page_size, head_dim] (one kv head of the pool); tables_ref: [n_pages] page ids,
    already clamped into range and padded to a multiple of pages_per_block by the wrapper.
    """
    ids = tables_ref[pl.ds(block * pages_per_block, pages_per_block)]
    x = pages_ref[ids]  # [pages_per_block, page_size, head_dim]: a gather straight from the pool
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def prepare_tables(block_tables, ctx_lens, num_pages: int, page_size: int, pages_per_block: int):
    """Block tables clamped into [0, num_pages) and padded to whole compute blocks, and context lengths
    clamped to the table's reach: ([batch, n_blocks * pages_per_block] int32, [batch, 1] int32).

    block_tables: [batch, n_pages] int32 (out-of-range ids are padding); ctx_lens: [batch] int32.
    """
    n_pages = block_tables.shape[1]
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1)
    tables = jnp.pad(tables, ((0, 0), (0, -n_pages % pages_per_block)))
    lens = jnp.clip(ctx_lens.astype(jnp.int32), 0, n_pages * page_size)
    return tables, lens.reshape(-1, 1)


def check_triton_dims(interpret: bool, **dims: int) -> None:
    """On the GPU, refuse block dimensions that Triton's loads and dots cannot take (powers of two >= 16)."""
    if interpret:
        return
    for name, value in dims.items():
        if value < 16 or value & (value - 1):
            raise ValueError(
                f"{name}={value}: the Triton lowering needs a power of two >= 16 (choose other block sizes, "
                "or run with interpret=True)"
            )


def check_power_of_2(interpret: bool, **dims: int) -> None:
    """On the GPU, refuse dimensions that are not powers of two (Triton tensor sizes)."""
    if interpret:
        return
    for name, value in dims.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value}: the Triton lowering needs a power of two (or interpret=True)")


def key_ranges(lo_pos, hi_pos, full_lo_pos, full_hi_pos, block: int):
    """Key blocks to visit, as three consecutive ranges: (masked, unmasked, masked).

    [lo_pos, hi_pos) bounds the positions any query of the program may see; [full_lo_pos, full_hi_pos)
    those that every query sees. All traced non-negative int32 scalars.
    """
    first, last = lax.div(lo_pos, block), cdiv(hi_pos, block)
    full_first = jnp.clip(cdiv(full_lo_pos, block), first, last)
    full_last = jnp.clip(lax.div(full_hi_pos, block), full_first, last)
    return first, full_first, full_last, last


def visit_ranges(body, ranges, carry):
    """Run `body(block, carry, masked)` over the (masked, unmasked, masked) block ranges of `key_ranges`."""
    first, full_first, full_last, last = ranges
    carry = lax.fori_loop(first, full_first, lambda i, c: body(i, c, True), carry)
    carry = lax.fori_loop(full_first, full_last, lambda i, c: body(i, c, False), carry)
    return lax.fori_loop(full_last, last, lambda i, c: body(i, c, True), carry)


def attend_context(carry, q, q_first, ctx_len, kp_ref, vp_ref, tables_ref, *, pages_per_block, window, scale):
    """Fold one sequence's cached context into the running softmax of its queries q [block_q, head_dim], the
    sequence's new tokens q_first.. (at positions ctx_len + q_first + row): pages read through the table up to
    ctx_len only, within `window` (0: all) of each query. Blocks no query sees are skipped; blocks every query
    sees in full skip the masking. kp_ref, vp_ref: [num_pages, page_size, head_dim]; tables_ref: [n_table]."""
    block_q = q.shape[0]
    block_c = pages_per_block * kp_ref.shape[1]
    q_pos = ctx_len + q_first + jnp.arange(block_q)

    def body(i, carry, masked):
        k = gather_block(kp_ref, tables_ref, i, pages_per_block)
        v = gather_block(vp_ref, tables_ref, i, pages_per_block)
        if not masked:
            return softmax_step(carry, q, k, v, scale)
        pos = i * block_c + jnp.arange(block_c)
        valid = pos < ctx_len
        v = jnp.where(valid[:, None], v, 0)  # slots past ctx_len may hold stale data, NaN included
        mask = valid[None, :]
        if window:
            mask = mask & (q_pos[:, None] - pos[None, :] < window)
        return softmax_step(carry, q, k, v, scale, mask)

    lo = jnp.maximum(ctx_len + q_first - window + 1, 0) if window else 0
    full_lo = jnp.maximum(ctx_len + q_first + block_q - window, 0) if window else 0
    return visit_ranges(body, key_ranges(lo, ctx_len, full_lo, ctx_len, block_c), carry)
