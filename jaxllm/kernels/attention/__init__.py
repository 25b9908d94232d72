"""Attention over new tokens plus a paged KV context: one interface, implementation chosen by backend."""

from __future__ import annotations

from jaxllm.kernels.attention import reference


def paged_attention(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, sliding_window: int | None = None):
    """Attention output [batch, seq, q_heads, head_dim]; arguments as in `reference.paged_attention`."""
    return reference.paged_attention(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, sliding_window)
