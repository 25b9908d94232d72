"""Quantized weights as pytrees: one layout for every format, so that kernels have one thing to read.

A `QuantizedWeight` is a matrix [N, K] (N output features, K contraction features, both possibly
flattened from several logical dims) with groups of `group` consecutive values along K:

    w[n, k] = scale[n, k // group] * value(q)[n, k] + offset[n, k // group]      (offset None: 0)

`kind` says how `q` stores the integer (or fp8) values:
- "int8": int8 [..., N, K], any value in [-128, 127] (Q8_0, Q5_*, Q6_K, int8 ISQ).
- "uint4": uint8 [..., N, K // 2], two values in [0, 15] per byte: element 2j in the low nibble, 2j + 1 in
  the high one (Q4_*, Q2_K, Q3_K, int4 ISQ; signed formats carry their zero point in `offset`).
- "fp8": float8_e4m3fn [..., N, K] (fp8 ISQ).
- "f16", "bf16": float16 / bfloat16 [..., N, K] with group K and scale 1 (a GGUF F16/BF16 tensor kept in
  its stored dtype: half the bytes of float32, read by the same kernels).
scale and offset are float32 [..., N, K // group]. Leading dims (`...`) stack layers. Every GGUF block
format maps onto this losslessly: its per-block (and per-sub-block) scales and minimums, multiplied out in
float32, are exact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# kind -> dtype of `q`
Q_DTYPES = {"int8": jnp.int8, "uint4": jnp.uint8, "fp8": jnp.float8_e4m3fn, "f16": jnp.float16, "bf16": jnp.bfloat16}
KINDS = tuple(Q_DTYPES)
# Kinds whose values are floats: they hold each other's values only when equal (no lossless widening).
FLOAT_KINDS = ("fp8", "f16", "bf16")


def stored_k(kind: str, k: int) -> int:
    """The last dim of `q` for K values of `kind` (uint4 packs two to a byte)."""
    return k // 2 if kind == "uint4" else k


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized matrix [N, K] (see the module docstring); `in_shape`/`out_shape` are its logical dims and
    `axes` the logical axis names of N and K."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    # The logical axes of N and K (their first logical dims), which a placement may shard the weight over.
    axes: tuple[str | None, str | None] = dataclasses.field(default=(None, None), metadata=dict(static=True))

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    @property
    def k(self) -> int:
        return math.prod(self.in_shape)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.q, self.scale, self.offset) if a is not None)

    def values(self) -> jax.Array:
        """The stored integer (or fp8) values as float32 [..., N, K]."""
        if self.kind == "uint4":
            # A bitcast to packed uint4 (low nibble first) lets XLA fuse the unpacking into the consumer;
            # masking and shifting into a stacked pair cost ~20% of a 512-row prefill on XLA:CPU.
            nibbles = jax.lax.bitcast_convert_type(self.q, jnp.uint4)
            return nibbles.reshape(*self.q.shape[:-1], -1).astype(jnp.float32)
        return self.q.astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float matrix [..., N, K] this weight stands for."""
        v = self.values()
        lead = v.shape[:-1]
        v = v.reshape(*lead, self.k // self.group, self.group)
        w = v * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(*lead, self.k).astype(dtype)


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """uint8 [..., K] of values in [0, 15] -> uint8 [..., K // 2], element 2j low nibble, 2j + 1 high."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_uint4`: uint8 [..., K // 2] -> uint8 [..., K]."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0xF, packed >> 4
    return out
