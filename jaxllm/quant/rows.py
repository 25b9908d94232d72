"""Quantized rows on the host: what a loader holds between reading a checkpoint tensor and placing a weight.

`QuantRows` is a torch-layout matrix [rows, K] in the `QuantizedWeight` scheme with its values unpacked (one
integer per byte), so that rows can be permuted, concatenated and widened to a common format losslessly
before they are packed for the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.quant.format import FLOAT_KINDS, QuantizedWeight, pack_uint4


@dataclasses.dataclass(frozen=True)
class Format:
    """A storage format: kind (see `quant.format`), group size along K (0: the whole row), offset or not."""

    kind: str
    group: int
    offset: bool

    def group_for(self, k: int) -> int:
        return self.group or k


@dataclasses.dataclass
class QuantRows:
    """values [rows, K] (uint8 for 'uint4', int8 for 'int8', float8_e4m3fn for 'fp8', float16 / bfloat16 for
    'f16' / 'bf16'); scale, offset float32 [rows, K // group] (offset None: zero)."""

    kind: str
    group: int
    values: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None

    @property
    def format(self) -> Format:
        return Format(self.kind, self.group, self.offset is not None)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, K]."""
        rows, k = self.values.shape
        v = self.values.astype(np.float32).reshape(rows, k // self.group, self.group)
        w = v * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(rows, k)

    def take(self, index: np.ndarray) -> QuantRows:
        """These rows reordered (or selected) by `index`."""
        off = None if self.offset is None else self.offset[index]
        return QuantRows(self.kind, self.group, self.values[index], self.scale[index], off)

    def widen(self, fmt: Format) -> QuantRows:
        """The same values in a format that holds them exactly: uint4 -> int8, a group split into smaller
        groups, a zero offset added. Raises ValueError where the conversion would lose information."""
        if fmt == self.format:
            return self
        if self.kind in FLOAT_KINDS or fmt.kind in FLOAT_KINDS:
            raise ValueError(f"cannot convert {self.kind} rows to {fmt.kind} without loss")
        if self.kind == "int8" and fmt.kind == "uint4":
            raise ValueError("cannot narrow int8 rows to uint4")
        if self.group % fmt.group or (self.offset is not None and not fmt.offset):
            raise ValueError(f"cannot regroup {self.format} as {fmt} without loss")
        values = self.values.astype(np.int8) if fmt.kind == "int8" else self.values
        rep = self.group // fmt.group
        scale = np.repeat(self.scale, rep, axis=1)
        offset = np.zeros_like(scale) if self.offset is None else np.repeat(self.offset, rep, axis=1)
        return QuantRows(fmt.kind, fmt.group, values, scale, offset if fmt.offset else None)


def common_format(formats) -> Format:
    """The narrowest format that holds every one of `formats` exactly (for fusing or stacking tensors)."""
    formats = list(formats)
    kinds = {f.kind for f in formats}
    if kinds & set(FLOAT_KINDS) and len(kinds) > 1:
        raise ValueError(f"{' and '.join(sorted(kinds))} rows cannot be combined without loss")
    kind = "int8" if kinds == {"uint4", "int8"} else kinds.pop()
    return Format(kind, min(f.group for f in formats), any(f.offset for f in formats))


def concat_rows(parts: list[QuantRows]) -> QuantRows:
    """Rows of several tensors one after the other, in their common format."""
    fmt = common_format(p.format for p in parts)
    parts = [p.widen(fmt) for p in parts]
    join = np.concatenate
    off = join([p.offset for p in parts]) if fmt.offset else None
    return QuantRows(fmt.kind, fmt.group, join([p.values for p in parts]), join([p.scale for p in parts]), off)


def to_weight(
    rows: QuantRows, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes=(None, None)
) -> QuantizedWeight:
    """Pack for the device (numpy arrays; the caller places them): [..., N, K] in the `QuantizedWeight` layout;
    axes: the logical axis names of N and K."""
    q = pack_uint4(rows.values) if rows.kind == "uint4" else rows.values
    scale = np.ascontiguousarray(rows.scale, np.float32)
    offset = None if rows.offset is None else np.ascontiguousarray(rows.offset, np.float32)
    return QuantizedWeight(np.ascontiguousarray(q), scale, offset, rows.kind, rows.group, in_shape, out_shape, axes)
