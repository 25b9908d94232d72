"""Quantized matmul: x [M, K] times a `QuantizedWeight` [N, K] transposed, implementation chosen by backend.

On the CPU the native C++ kernel (`native_qmatmul.cc`) takes small row counts (decode), where it streams
the quantized bytes once for every row; larger ones (prefill) dequantize once and run XLA's float dot,
which is compute-bound there anyway, unless bf16 dot products are on ($JAXLLM_QMATMUL_BF16=1): then the
native kernel takes every row count. On GPU the Pallas kernel runs; the reference wherever neither applies.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

from jaxllm.kernels.qmatmul import native
from jaxllm.kernels.qmatmul.pallas import pallas_qmatmul
from jaxllm.kernels.qmatmul.reference import qmatmul as reference_qmatmul

log = logging.getLogger(__name__)
IMPLS = ("reference", "native", "pallas", "pallas-interpret")
# Above this many rows the CPU dequantizes and runs XLA's dot (see docs/benchmarks.md, quantized matmul).
NATIVE_MAX_ROWS = 64


def default_impl() -> str:
    """$JAXLLM_QMATMUL when set (one of IMPLS), else 'pallas' on GPU and 'native' on the CPU."""
    impl = os.environ.get("JAXLLM_QMATMUL") or ("pallas" if jax.default_backend() == "gpu" else "native")
    if impl not in IMPLS:
        raise ValueError(f"JAXLLM_QMATMUL={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def qmatmul(x, w, layer=None, impl: str | None = None):
    """x [M, K] float times w [N, K] (a `QuantizedWeight`, stacked [L, N, ...] read at `layer` when given)
    -> [M, N] float32. impl: one of IMPLS (None: `default_impl()`); an implementation asked for by name
    raises on inputs it cannot take instead of falling back to the reference."""
    chosen = impl or os.environ.get("JAXLLM_QMATMUL")
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"unknown quantized matmul {impl!r}: use one of {', '.join(IMPLS)}")
    # With bf16 dot products on, the native kernel takes every row count: at 272 rows it beats XLA's float32 dot
    # 1.35x (281 vs 379 ms for a SmolLM2 mixed step); in exact float32 XLA's dot is the faster from 64 rows.
    fits = x.shape[0] <= NATIVE_MAX_ROWS or native.bf16_dot_for(x.shape[0])
    if impl == "native" and (chosen or (fits and native.available())):
        try:
            return native.native_qmatmul(x, w, layer, bf16_dot=native.bf16_dot_for(x.shape[0]))
        except ValueError as e:  # what it does not take (raised while tracing)
            if chosen:
                raise
            _warn_fallback("native", str(e))
    elif impl.startswith("pallas"):
        try:
            return pallas_qmatmul(x, w, layer, interpret=impl == "pallas-interpret")
        except ValueError as e:
            if chosen:
                raise
            _warn_fallback("Pallas", str(e))
    return reference_qmatmul(x, w, layer)


@functools.cache
def _warn_fallback(kernel: str, reason: str) -> None:
    log.warning("qmatmul: the %s kernel cannot take these inputs (%s); using the reference", kernel, reason)


__all__ = ["IMPLS", "default_impl", "qmatmul", "reference_qmatmul"]
