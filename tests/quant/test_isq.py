"""In-situ quantization: schemes by name, and the error each format promises."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.errors import QuantizationError
from jaxllm.quant.isq import IsqScheme, parse_scheme, quantize


def test_scheme_names():
    assert parse_scheme("int8") == IsqScheme("int8")
    assert parse_scheme("fp8") == IsqScheme("fp8")
    assert parse_scheme("int4") == IsqScheme("int4", 32, False)
    assert parse_scheme("INT4-sym-g128") == IsqScheme("int4", 128, True)
    assert parse_scheme("int4-asym-g64") == IsqScheme("int4", 64, False)
    for bad in ("int3", "int4-g48", "int8-g32", "fp16", "int4-foo"):
        with pytest.raises(QuantizationError, match="unknown quantization"):
            parse_scheme(bad)


@pytest.mark.parametrize(
    "name, kind, bound",
    [
        ("int8", "int8", 0.5 / 127),  # half a step of max|w| / 127 per row
        ("int4-sym", "uint4", 0.5 / 5),  # half a step of at most max|w| / 5 per group
        ("int4-g64", "uint4", 0.5 / 15),  # half a step of (max - min) / 15, bounded by 2 max|w| below
        ("fp8", "fp8", 2.0**-4),  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4
    ],
)
def test_error_is_within_the_format_step(name, kind, bound):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (48, 256)).astype(np.float32)
    w[3] = 0  # an all-zero row must not divide by zero
    rows = quantize(w, parse_scheme(name))
    assert rows.kind == kind
    err = np.abs(rows.dequantize() - w)
    scale = np.abs(w).max() * (2 if name == "int4-g64" else 1)
    if name == "fp8":
        assert np.all(err <= bound * np.abs(w) + 1e-6 * np.abs(w).max())
    else:
        assert err.max() <= bound * scale * 1.0001
    assert np.all(rows.dequantize()[3] == 0)


def test_groups_must_divide_the_rows():
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize(np.ones((4, 96), np.float32), parse_scheme("int4-g64"))
