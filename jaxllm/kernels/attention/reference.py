"""Reference attention in plain `jax.numpy`: causal, grouped-query, optional sliding window.

A query block of new tokens attends to (a) the first `ctx_len` cached slots of its row, of which
the first `ctx_lens[b]` are valid, and (b) the new tokens themselves, causally. Both parts share
one softmax. Keeping the new keys out of the cache read means the cache can be passed in
read-only and written once, after all layers, with one scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def attention(q, k_new, v_new, k_ctx, v_ctx, ctx_lens, sliding_window: int | None = None):
    """Attention output [batch, seq, q_heads, head_dim].

    q: [batch, seq, q_heads, head_dim]; k_new, v_new: [batch, seq, kv_heads, head_dim] (the keys and
    values of the same new tokens); k_ctx, v_ctx: [batch, ctx_len, kv_heads, head_dim] cached context,
    or None; ctx_lens: [batch] int32 number of valid cached slots per row (the new tokens sit at
    positions ctx_lens[b] + t). q_heads must be a multiple of kv_heads.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d) * (1.0 / float(d) ** 0.5)

    qi = jnp.arange(t)[:, None]
    ki = jnp.arange(t)[None, :]
    new_mask = ki <= qi
    if sliding_window:
        new_mask &= (qi - ki) < sliding_window
    scores = [jnp.einsum("btkgd,bskd->bkgts", qg, k_new, preferred_element_type=jnp.float32)]
    masks = [jnp.broadcast_to(new_mask[None, None, None], scores[0].shape)]

    if k_ctx is not None:
        s = k_ctx.shape[1]
        slot = jnp.arange(s)[None, None, :]
        ctx_mask = slot < ctx_lens[:, None, None]
        if sliding_window:
            q_pos = ctx_lens[:, None, None] + jnp.arange(t)[None, :, None]
            ctx_mask &= (q_pos - slot) < sliding_window
        ctx_scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_ctx, preferred_element_type=jnp.float32)
        scores.insert(0, ctx_scores)
        masks.insert(0, jnp.broadcast_to(ctx_mask[:, None, None], ctx_scores.shape))

    logits = jnp.where(jnp.concatenate(masks, -1), jnp.concatenate(scores, -1), NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_new.dtype)

    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., -t:], v_new)
    if k_ctx is not None:
        out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., :-t], v_ctx)
    return out.reshape(b, t, h, d)
