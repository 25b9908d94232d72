"""The quantized matmul in plain `jax.numpy`: dequantize, then one float dot. The truth the kernels match."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.quant.format import QuantizedWeight


def qmatmul(x: jax.Array, w: QuantizedWeight, layer=None) -> jax.Array:
    """x [M, K] (float) times the quantized w [N, K] transposed -> [M, N] float32.

    w may be stacked [L, N, ...] and read at `layer` ([] int32); with layer None it is one matrix.
    """
    if layer is not None:
        w = jax.tree.map(lambda a: a[layer], w)
    dense = w.dequantize(jnp.float32)
    return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), dense, preferred_element_type=jnp.float32)
