"""Attention and matmul kernels behind one interface each, chosen by backend.

Only the `jax.numpy` reference exists so far; Pallas kernels join beside it (issue 4).
"""

from jaxllm.kernels.attention.reference import attention

__all__ = ["attention"]
