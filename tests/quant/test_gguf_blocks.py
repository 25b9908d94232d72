"""GGUF block formats repacked into QuantRows decode exactly like the `gguf` package's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from jaxllm.quant.gguf_blocks import DECODERS, block_format, repack
from jaxllm.quant.rows import Format, concat_rows, to_weight

# byte offsets of each type's float16 fields (d, and m/dmin where present) within a block
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every quant and scale bit, with finite float16 fields: [rows, bytes per row]."""
    rng = np.random.default_rng(seed)
    block, size, _ = DECODERS[type_name]
    raw = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        raw[:, at : at + 2] = rng.normal(0, 0.1, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_every_block_type_decodes_like_gguf(type_name):
    rows, k = 5, 512
    raw = random_blocks(type_name, rows, k)
    want = quants.dequantize(raw, getattr(GGMLQuantizationType, type_name)).reshape(rows, k)
    got = repack(raw, type_name, rows, k)
    assert got.format == block_format(type_name)
    np.testing.assert_array_equal(got.dequantize(), want)
    packed = to_weight(got, (k,), (rows,))  # and through the device layout
    np.testing.assert_array_equal(np.asarray(packed.dequantize()), want)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_f16_and_bf16_tensors_are_kept_as_stored(type_name):
    rows, k = 5, 512
    floats = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    raw = quants.quantize(floats, getattr(GGMLQuantizationType, type_name))
    want = quants.dequantize(raw, getattr(GGMLQuantizationType, type_name)).reshape(rows, k)
    got = repack(raw, type_name, rows, k)
    assert got.kind == block_format(type_name).kind == type_name.lower() and got.values.itemsize == 2
    np.testing.assert_array_equal(got.dequantize(), want)
    np.testing.assert_array_equal(np.asarray(to_weight(got, (k,), (rows,)).dequantize()), want)
    with pytest.raises(ValueError):
        concat_rows([got, repack(random_blocks("Q8_0", 2, k), "Q8_0", 2, k)])


def test_fused_rows_widen_losslessly():
    k = 256
    parts = [repack(random_blocks(t, 3, k, i), t, 3, k) for i, t in enumerate(["Q4_1", "Q6_K", "Q8_0"])]
    fused = concat_rows(parts)
    assert fused.format == Format("int8", 16, True)
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([p.dequantize() for p in parts]))


def test_a_row_permutation_moves_whole_rows():
    rows = repack(random_blocks("Q4_K", 8, 256), "Q4_K", 8, 256)
    order = np.array([3, 1, 7, 0, 2, 6, 4, 5])
    np.testing.assert_array_equal(rows.take(order).dequantize(), rows.dequantize()[order])


def test_narrowing_is_refused():
    int8 = repack(random_blocks("Q8_0", 2, 64), "Q8_0", 2, 64)
    with pytest.raises(ValueError):
        int8.widen(Format("uint4", 32, True))
    with pytest.raises(ValueError):
        int8.widen(Format("int8", 64, False))  # a coarser group would drop scales
