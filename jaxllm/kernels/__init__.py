"""Attention and matmul kernels behind one interface each, chosen by backend.

`paged_attention` runs the Pallas kernels on GPU (flash attention for prefill, paged decode attention
for single-token steps), the native C++ decode kernel on the CPU (the reference for prefill there), and
the `jax.numpy` reference wherever neither applies.
"""

from jaxllm.kernels.attention import Ragged, paged_attention, reads_to_length

__all__ = ["Ragged", "paged_attention", "reads_to_length"]
