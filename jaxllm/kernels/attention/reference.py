"""Reference attention in plain `jax.numpy`: causal, grouped-query, optional sliding window, paged context.

A query block of new tokens attends to (a) its cached context, read from a pool of pages through a
block table, of which the first `ctx_lens[b]` positions are valid, and (b) the new tokens themselves,
causally. The two parts share one softmax, merged through their common maximum, so nothing is
concatenated. Keeping the new keys out of the cache read means the cache can be passed in read-only
and written once, after all layers, with one scatter.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = -1e30


def gather_pages(pages, block_tables):
    """The context of each row laid out contiguously: [batch, n_pages * page_size, kv_heads, head_dim].

    pages: [num_pages, page_size, kv_heads, head_dim]; block_tables: [batch, n_pages] int32 page ids
    (out-of-range ids read the last position of the pool; mask them through ctx_lens). Gathers token
    rows of the flattened pool, which XLA:CPU does faster than whole pages.
    """
    num_pages, page_size = pages.shape[:2]
    rows = (block_tables[:, :, None] * page_size + jnp.arange(page_size, dtype=block_tables.dtype)).reshape(
        block_tables.shape[0], -1
    )
    return jnp.take(pages.reshape(num_pages * page_size, *pages.shape[2:]), rows, axis=0, mode="clip")


def paged_attention(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, sliding_window: int | None = None):
    """Attention output [batch, seq, q_heads, head_dim] with the cached context read through block tables.

    q: [batch, seq, q_heads, head_dim]; k_new, v_new: [batch, seq, kv_heads, head_dim];
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim] (one layer's pool) or None for no
    cached context; block_tables: [batch, n_pages] int32, the pages holding positions
    [0, n_pages * page_size) of each row; ctx_lens: [batch] int32 valid cached positions per row (the
    new tokens sit at positions ctx_lens[b] + t).
    """
    if k_pages is None:
        return attention(q, k_new, v_new, None, None, ctx_lens, sliding_window)
    k_ctx, v_ctx = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    return attention(q, k_new, v_new, k_ctx, v_ctx, ctx_lens, sliding_window)


def attention(q, k_new, v_new, k_ctx, v_ctx, ctx_lens, sliding_window: int | None = None):
    """Attention output [batch, seq, q_heads, head_dim] over a contiguous context.

    q: [batch, seq, q_heads, head_dim]; k_new, v_new: [batch, seq, kv_heads, head_dim] (the keys and
    values of the same new tokens); k_ctx, v_ctx: [batch, ctx_len, kv_heads, head_dim] cached context,
    or None; ctx_lens: [batch] int32 number of valid cached slots per row (the new tokens sit at
    positions ctx_lens[b] + t). q_heads must be a multiple of kv_heads.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    if t == 1 and k_ctx is not None:
        return _decode_attention(q, k_new, v_new, k_ctx, v_ctx, ctx_lens, sliding_window)
    qg = q.reshape(b, t, kvh, h // kvh, d) * (1.0 / float(d) ** 0.5)

    qi = jnp.arange(t)[:, None]
    ki = jnp.arange(t)[None, :]
    new_mask = ki <= qi
    if sliding_window:
        new_mask &= (qi - ki) < sliding_window
    s_new = jnp.einsum("btkgd,bskd->bkgts", qg, k_new, preferred_element_type=jnp.float32)
    s_new = jnp.where(new_mask, s_new, NEG_INF)
    m = s_new.max(-1)

    if k_ctx is not None:
        slot = jnp.arange(k_ctx.shape[1])[None, None, :]
        ctx_mask = slot < ctx_lens[:, None, None]  # [b, 1, s]
        if sliding_window:
            q_pos = ctx_lens[:, None, None] + jnp.arange(t)[None, :, None]
            ctx_mask = ctx_mask & ((q_pos - slot) < sliding_window)  # [b, t, s]
        s_ctx = jnp.einsum("btkgd,bskd->bkgts", qg, k_ctx, preferred_element_type=jnp.float32)
        s_ctx = jnp.where(ctx_mask[:, None, None], s_ctx, NEG_INF)
        m = jnp.maximum(m, s_ctx.max(-1))

    p_new = jnp.exp(s_new - m[..., None])
    denom = p_new.sum(-1)
    out = jnp.einsum("bkgts,bskd->btkgd", p_new.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32)
    if k_ctx is not None:
        p_ctx = jnp.exp(s_ctx - m[..., None])
        denom = denom + p_ctx.sum(-1)
        out = out + jnp.einsum(
            "bkgts,bskd->btkgd", p_ctx.astype(v_ctx.dtype), v_ctx, preferred_element_type=jnp.float32
        )
    out = out / jnp.moveaxis(denom, -1, 1)[..., None]
    return out.reshape(b, t, h, d).astype(q.dtype)


def _decode_attention(q, k_new, v_new, k_ctx, v_ctx, ctx_lens, sliding_window):
    """`attention` for one new token per row. The contractions keep the context as the long dimension
    ([ctx, head_dim] x [head_dim, group] per row and kv head), which XLA:CPU runs ~20% faster than the
    general form at batch 32."""
    b, _, h, d = q.shape
    kvh = k_new.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d) * (1.0 / float(d) ** 0.5)
    slot = jnp.arange(k_ctx.shape[1])[None, :]
    mask = slot < ctx_lens[:, None]  # [b, s]
    if sliding_window:
        mask &= (ctx_lens[:, None] - slot) < sliding_window
    s_ctx = jnp.einsum("bskd,bkgd->bkgs", k_ctx, qg, preferred_element_type=jnp.float32)
    s_ctx = jnp.where(mask[:, None, None, :], s_ctx, NEG_INF)
    s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new[:, 0], preferred_element_type=jnp.float32)
    m = jnp.maximum(s_ctx.max(-1), s_new)
    p_ctx, p_new = jnp.exp(s_ctx - m[..., None]), jnp.exp(s_new - m)
    denom = p_ctx.sum(-1) + p_new
    out = jnp.einsum("bkgs,bskd->bkgd", p_ctx.astype(v_ctx.dtype), v_ctx, preferred_element_type=jnp.float32)
    out = out + p_new[..., None] * v_new[:, 0, :, None, :].astype(jnp.float32)
    return (out / denom[..., None]).reshape(b, 1, h, d).astype(q.dtype)


def ragged_paged_attention(
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
    max_q_len: int,
    sliding_window: int | None = None,
):
    """Attention output [tokens, q_heads, head_dim] for ragged new tokens (see `native_paged_attention`).

    q: [tokens, q_heads, head_dim]; k_new, v_new: [tokens, kv_heads, head_dim]; k_pages, v_pages: one layer's
    pool [num_pages, page_size, kv_heads, head_dim]; block_tables: [seqs, n_pages]; ctx_lens, q_starts, q_lens:
    [seqs] (cached positions, first new token's index, new tokens); seq_ids: [tokens] (out of range: padding,
    output zero); max_q_len: static bound on q_lens. Each sequence's tokens are laid out as one padded row of
    `max_q_len` and attended as `paged_attention` does; outputs go back to their tokens.
    """
    n_seqs = block_tables.shape[0]
    idx = q_starts[:, None] + jnp.arange(max_q_len, dtype=q_starts.dtype)[None]  # [seqs, max_q_len]
    rows = lambda x: jnp.take(x, idx, axis=0, mode="clip")
    out = paged_attention(rows(q), rows(k_new), rows(v_new), k_pages, v_pages, block_tables, ctx_lens, sliding_window)
    seq = jnp.clip(seq_ids, 0, n_seqs - 1)
    offset = jnp.arange(q.shape[0], dtype=seq_ids.dtype) - q_starts[seq]
    valid = (seq_ids >= 0) & (seq_ids < n_seqs) & (offset >= 0) & (offset < q_lens[seq])
    picked = out[seq, jnp.clip(offset, 0, max_q_len - 1)]
    return jnp.where(valid[:, None, None], picked, 0).astype(q.dtype)
