"""The quantized matmul on the CPU as a native XLA FFI kernel (`native_qmatmul.cc`), built on first use.

XLA:CPU runs the reference's dequantize-then-dot as a conversion to a float32 copy of the weight and a
dot. The kernel reads the quantized bytes once and decodes 32 weights of 4 rows at a time into AVX-512
registers, each decode serving 4 rows of x, so that a batch-1 step streams the weights at memory
bandwidth (fewer bytes than float32: faster) and larger batches run at the FMA units' peak. The math is
the reference's float math (each weight dequantized as `scale * value + offset` in one fused
multiply-add, float32 accumulation): results differ from it only by float32 summation order, well within
1e-5 of sum_k |x[m, k]| |w[n, k]|. Activations are not quantized, unless asked:

With `int8_activations` (int8 and uint4 weights, groups that are multiples of 32 or all of K), each row
of x is first quantized into int8 blocks of 32 as llama.cpp's Q8_0 (d = absmax / 127, q = round(x / d)),
and the weights are dotted with it in integers (AVX-512 VNNI, 64 multiply-adds per instruction), each
block's sum scaled once by d * the weight's scale; the offset term uses d * (the block's sum of q). As
|x - d q| <= absmax / 254 for every element of a block, the result is within

    |y[m, n] - y^[m, n]| <= sum over blocks b of (absmax(x[m, b]) / 254) * sum_{k in b} |w[n, k]|

of the reference, plus float32 rounding as above. fp8 weights and groups of 16 keep the float math.
`int8_activations=None` reads $JAXLLM_QMATMUL_INT8_ACT ("1": on; otherwise off).

With `bf16_dot` (CPUs with AVX-512 BF16; K in whole 32-blocks, each in one group), x and each 32 dequantized
weights are rounded to bfloat16 and multiplied in pairs by vdpbf16ps, twice the float FMA's products per
instruction, with float32 sums: from ~16 rows, where the float math is bound by its FMAs, matmuls run
~1.3-1.4x faster. Each product then carries the two roundings (relative 2^-9 each), so the result is within
2^-7 * sum_k |x[m, k]| |w[n, k]| of the reference. The dispatcher asks for it from `BF16_MIN_ROWS` rows when
$JAXLLM_QMATMUL_BF16 is "1"; off by default, which keeps the float32 math exact.

It reads the stacked weight [layers, N, ...] at a layer index, so a layer scan hands it the whole stack
by reference: an operand sliced per layer would be copied for the call. The C++ source is compiled once
per machine by `jaxllm.kernels.native_build`; without a compiler, `available()` is False.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import native_build
from jaxllm.kernels.native_build import NativeKernelUnavailable
from jaxllm.quant.format import Q_DTYPES, QuantizedWeight, stored_k

__all__ = ["NativeKernelUnavailable", "available", "build", "native_qmatmul"]

TARGET = "jaxllm_qmatmul_f32"
SOURCE = Path(__file__).with_name("native_qmatmul.cc")


def build(compiler: str | None = None) -> Path:
    """Compile the kernel unless a build for this source, jaxlib and CPU exists; return the library path."""
    return native_build.build(SOURCE, "native_qmatmul", native_build.FLAGS, compiler)


@functools.cache
def _register() -> ctypes.CDLL:
    return native_build.load_and_register(build(), "JaxllmQMatmulF32", TARGET)  # cached: stays loaded


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered here (on the CPU backend); logs once why not."""
    return native_build.usable(_register, "qmatmul: the native CPU kernel")


def _check(x, w: QuantizedWeight, stacked: bool) -> None:
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise ValueError(f"the native qmatmul takes float32 x [M, K], got {x.dtype} {x.shape}")
    if w.kind not in Q_DTYPES or w.q.dtype != Q_DTYPES[w.kind]:
        raise ValueError(f"the native qmatmul takes kinds {tuple(Q_DTYPES)}, got {w.kind} with q {w.q.dtype}")
    k, group = x.shape[1], w.group
    if w.k != k:
        raise ValueError(f"x has K={k} but the weight contracts over {w.k}")
    if group <= 0 or k % group or (group % 16 and group != k) or (w.kind == "uint4" and k % 2):
        raise ValueError(f"the native qmatmul takes groups that are multiples of 16 or K, got {group} (K={k})")
    if w.kind in ("f16", "bf16") and w.offset is not None:
        raise ValueError(f"the native qmatmul takes {w.kind} weights without an offset")
    lead = 1 if stacked else 0
    n = w.q.shape[-2]
    expect_q = (n, stored_k(w.kind, k))
    arrays = (w.q, w.scale) + ((w.offset,) if w.offset is not None else ())
    if w.q.ndim != 2 + lead or w.q.shape[lead:] != expect_q:
        raise ValueError(f"q must be {'[L, ' if stacked else '['}{expect_q[0]}, {expect_q[1]}], got {w.q.shape}")
    for a in arrays[1:]:
        if a.dtype != jnp.float32 or a.shape != (*w.q.shape[:lead], n, k // group):
            raise ValueError(f"scale and offset must be float32 [..., {n}, {k // group}], got {a.dtype} {a.shape}")


# Row counts from which $JAXLLM_QMATMUL_BF16=1 switches to bf16 dot products (below, memory-bound: no gain).
BF16_MIN_ROWS = 16


def bf16_dot_for(rows: int) -> bool:
    """Whether a call of `rows` rows of x takes the bf16 dot products ($JAXLLM_QMATMUL_BF16 == "1")."""
    return os.environ.get("JAXLLM_QMATMUL_BF16") == "1" and rows >= BF16_MIN_ROWS


def native_qmatmul(
    x: jax.Array, w: QuantizedWeight, layer=None, *, int8_activations: bool | None = None, bf16_dot: bool = False
) -> jax.Array:
    """x [M, K] float32 times the quantized w [N, K] transposed -> [M, N] float32, as `reference.qmatmul`.

    w may be stacked [L, N, ...] and read at `layer` ([] int32); with layer None it is one matrix. Kinds
    int8, uint4 and fp8 with or without offset, f16 and bf16 without, groups that are multiples of 16 or all of K.
    int8_activations: quantize x to int8 blocks of 32 and dot in integers (see the module docstring for
    the error bound); None: $JAXLLM_QMATMUL_INT8_ACT == "1". Raises ValueError (while tracing) for what it
    does not take, and NativeKernelUnavailable when the kernel cannot be built here.
    """
    _check(x, w, stacked=layer is not None)
    _register()
    if int8_activations is None:
        int8_activations = os.environ.get("JAXLLM_QMATMUL_INT8_ACT") == "1"
    return _call(TARGET, x, w, layer, int8_activations, bf16_dot)


def _call(target: str, x, w: QuantizedWeight, layer, int8_activations: bool = False, bf16_dot: bool = False):
    """The FFI call to `target` (a build of `SOURCE`) on checked operands."""
    q, scale, offset = w.q, w.scale, w.offset
    if layer is None:
        q, scale, layer = q[None], scale[None], 0
        offset = offset[None] if offset is not None else None
    if offset is None:
        offset = jnp.zeros((0,), jnp.float32)
    m, n = x.shape[0], q.shape[1]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(
        x,
        q,
        scale,
        offset,
        jnp.asarray(layer, jnp.int32),
        group=np.int64(w.group),
        int8_activations=np.int64(int8_activations),
        bf16_dot=np.int64(bf16_dot),
    )
