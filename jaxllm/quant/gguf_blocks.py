"""GGUF block formats repacked, losslessly, into `QuantRows`: integer values plus float32 group scales/offsets.

F16 and BF16 tensors are kept as they are stored (kinds 'f16' and 'bf16', scale 1 per row); F32 ones are
float params in the compute dtype.

Each decoder takes a tensor's raw blocks uint8 [n_blocks, type_size] and returns values [n_blocks,
block_size] with scale/offset [n_blocks, block_size // group], such that scale * value + offset, computed in
float32, is bit-for-bit what `gguf.quants.dequantize` gives: a block's f16 scale times a sub-block's small
integer scale is exact in float32, and so is the product with a value of at most 6 bits.
"""

from __future__ import annotations

import numpy as np

from jaxllm.quant.format import Q_DTYPES
from jaxllm.quant.rows import Format, QuantRows

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes [n, m] -> [n, 2m]: each run of `width` bytes gives its low nibbles, then its high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0xF).reshape(n, -1)


def _bits(b: np.ndarray, width: int, shifts, mask: int) -> np.ndarray:
    """Bytes [n, m] -> [n, m * len(shifts)]: each run of `width` bytes read at every shift."""
    n = b.shape[0]
    q = b.reshape(n, -1, 1, width) >> np.array(shifts, np.uint8).reshape(1, 1, -1, 1)
    return (q & mask).reshape(n, -1)


def _q4_0(b):
    d = _f16(b[:, :2])
    return "uint4", 32, _nibbles(b[:, 2:], 16), d, -8 * d


def _q4_1(b):
    return "uint4", 32, _nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_high(qh: np.ndarray) -> np.ndarray:
    """Four bytes of high bits [n, 4] -> [n, 32] (bit i of the little-endian word is element i's fifth bit)."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b):
    x = _nibbles(b[:, 6:], 16) | (_q5_high(b[:, 2:6]) << 4)
    return "int8", 32, x.astype(np.int8) - np.int8(16), _f16(b[:, :2]), None


def _q5_1(b):
    x = _nibbles(b[:, 8:], 16) | (_q5_high(b[:, 4:8]) << 4)
    return "int8", 32, x.astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b):
    return "int8", 32, np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, :2]), None


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _bits(qs, 32, [0, 2, 4, 6], 3)
    return "uint4", 16, q.reshape(n, -1), d * (scales & 0xF), -(dmin * (scales >> 4))


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(sc[:, :8], 8, [0, 4], 0xF)
    high = _bits(sc[:, 8:], 4, [0, 2, 4, 6], 3)
    scale = d * ((low | (high << 4)).astype(np.int8) - np.int8(32))
    ql = _bits(qs, 32, [0, 2, 4, 6], 3)
    qh = _bits(hmask, 32, range(8), 1)
    # value = ql - 4 * (1 - hbit) in [-4, 3], stored unsigned as value + 4 with the zero point in the offset
    return "uint4", 16, (ql + (qh << 2)).reshape(n, -1), scale, -4 * scale


def _scale_min_k4(sc: np.ndarray):
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K super-block: sc [n, 12] -> ([n, 8], [n, 8])."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = np.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def _q4_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return "uint4", 32, _nibbles(b[:, 16:], 32), d * sc, -(dmin * mn)


def _q5_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = _bits(b[:, 16:48], 32, range(8), 1)
    x = _nibbles(b[:, 48:], 32) | (qh << 4)
    return "int8", 32, x.astype(np.int8), d * sc, -(dmin * mn)


def _q6_k(b):
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    low = _nibbles(ql, 64)
    high = _bits(qh, 32, [0, 2, 4, 6], 3)
    x = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return "int8", 16, x, d * np.ascontiguousarray(sc).view(np.int8).astype(np.float32), None


# GGML type name -> (block size, bytes per block, decoder)
DECODERS = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# GGUF float types kept in their stored dtype -> QuantRows kind
KEPT_FLOAT_TYPES = {"F16": "f16", "BF16": "bf16"}
KEPT_TYPES = (*DECODERS, *KEPT_FLOAT_TYPES)


def block_format(type_name: str) -> Format | None:
    """The `QuantRows` format a GGUF type repacks into (None for F32, which loads as a float param)."""
    if type_name in KEPT_FLOAT_TYPES:
        return Format(KEPT_FLOAT_TYPES[type_name], 0, False)
    if type_name not in DECODERS:
        return None
    block, size, decode = DECODERS[type_name]
    kind, group, _, _, offset = decode(np.zeros((1, size), np.uint8))
    return Format(kind, group, offset is not None)


def repack(raw: np.ndarray, type_name: str, rows: int, k: int) -> QuantRows:
    """A tensor's raw bytes (any shape, `rows` rows of `k` values) -> QuantRows [rows, k]."""
    if type_name in KEPT_FLOAT_TYPES:
        kind = KEPT_FLOAT_TYPES[type_name]
        values = np.ascontiguousarray(raw).view(Q_DTYPES[kind]).reshape(rows, k)
        return QuantRows(kind, k, values, np.ones((rows, 1), np.float32), None)
    block, size, decode = DECODERS[type_name]
    if k % block:
        raise ValueError(f"rows of {k} values are not whole {type_name} blocks of {block}")
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(-1, size)
    kind, group, values, scale, offset = decode(blocks)
    values = values.reshape(rows, k)
    scale = np.ascontiguousarray(scale, np.float32).reshape(rows, k // group)
    if offset is not None:
        offset = np.ascontiguousarray(offset, np.float32).reshape(rows, k // group)
    if kind == "uint4":
        values = values.astype(np.uint8)
    return QuantRows(kind, group, values, scale, offset)
