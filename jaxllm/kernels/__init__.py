"""Attention and matmul kernels behind one interface each, chosen by backend.

`paged_attention` runs the Pallas kernels on GPU (flash attention for prefill, paged decode attention
for single-token steps) and the `jax.numpy` reference everywhere else.
"""

from jaxllm.kernels.attention import paged_attention

__all__ = ["paged_attention"]
