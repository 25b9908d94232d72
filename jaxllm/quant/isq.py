"""In-situ quantization (ISQ): float weights [N, K] quantized while loading, one tensor at a time.

- "int8": symmetric, one scale per output channel (row): q = round(w / s), s = max|w| / 127.
- "int4" (group 32 by default; "int4-g64", "int4-g128"): asymmetric by default, each group's [min, max]
  mapped onto [0, 15] (a zero point per group, as Q4_1, GPTQ and AWQ keep); "int4-sym..." stores q - 8 in
  [-8, 7] with no zero point (as Q4_0). On SmolLM2 int4-sym costs ~18% perplexity, int4 (asymmetric) ~0%
  (docs/benchmarks.md): groups are rarely centred on zero.
- "fp8": float8 e4m3 values with one scale per output channel, s = max|w| / 448.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from jaxllm.errors import QuantizationError
from jaxllm.quant.rows import Format, QuantRows

FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class IsqScheme:
    """What `quant=` names: the method ('int8', 'int4', 'fp8'), the int4 group size and symmetry."""

    method: str
    group: int = 0
    symmetric: bool = False

    @property
    def format(self) -> Format:
        if self.method == "int4":
            return Format("uint4", self.group, True)
        return Format("int8" if self.method == "int8" else "fp8", 0, False)


def parse_scheme(name: str) -> IsqScheme:
    """'int8' | 'fp8' | 'int4' | 'int4-g64' | 'int4-sym' | 'int4-sym-g128' ... -> IsqScheme."""
    parts = name.lower().split("-")
    method, rest = parts[0], parts[1:]
    if method in ("int8", "fp8") and not rest:
        return IsqScheme(method)
    if method == "int4":
        symmetric, group = False, 32
        for p in rest:
            if p in ("asym", "sym"):
                symmetric = p == "sym"
            elif p.startswith("g") and p[1:] in ("32", "64", "128"):
                group = int(p[1:])
            else:
                break
        else:
            return IsqScheme("int4", group, symmetric)
    raise QuantizationError(
        f"unknown quantization {name!r}: use int8, fp8 or int4 (optionally -g32/-g64/-g128 and -sym), e.g. int4-g64"
    )


def _symmetric_int4_scale(wg: np.ndarray) -> np.ndarray:
    """Per-group scales [n, groups] for values q - 8 in [-8, 7] of groups wg [n, groups, g].

    The value of largest magnitude maps near the -8 end (one more level than +7), and of a few scales around
    that, each group keeps the one with the least squared error: a single outlier then costs less resolution."""
    extreme = np.take_along_axis(wg, np.abs(wg).argmax(axis=2)[..., None], axis=2)[..., 0]
    best, best_err = None, None
    for levels in (-8.0, -7.5, -7.0, -6.5, -6.0, -5.5, -5.0):
        scale = extreme / levels
        safe = np.where(scale == 0, 1, scale)[..., None]
        err = ((np.clip(np.rint(wg / safe), -8, 7) * safe - wg) ** 2).sum(axis=2)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
    return best


def quantize(w: np.ndarray, scheme: IsqScheme) -> QuantRows:
    """A float matrix [N, K] (torch layout: rows are output channels) -> QuantRows in the scheme's format."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if scheme.method in ("int8", "fp8"):
        # one float temporary, reused in place: ISQ runs layer by layer while loading, and its peak counts
        t = np.abs(w)
        scale = t.max(axis=1, keepdims=True) / (127.0 if scheme.method == "int8" else FP8_MAX)
        np.divide(w, np.where(scale == 0, 1, scale), out=t)
        if scheme.method == "fp8":
            return QuantRows("fp8", k, t.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32), None)
        np.clip(np.rint(t, out=t), -127, 127, out=t)
        return QuantRows("int8", k, t.astype(np.int8), scale.astype(np.float32), None)
    g = scheme.group
    if k % g:
        raise QuantizationError(f"int4 group {g} does not divide rows of {k} values: choose a group that does")
    wg = w.reshape(n, k // g, g)
    if scheme.symmetric:
        scale = _symmetric_int4_scale(wg)
        offset = -8.0 * scale
    else:
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        scale, offset = (hi - lo) / 15.0, lo
    safe = np.where(scale == 0, 1, scale)[..., None]
    t = np.subtract(wg, offset[..., None])
    np.divide(t, safe, out=t)
    np.clip(np.rint(t, out=t), 0, 15, out=t)
    q = t.astype(np.uint8).reshape(n, k)
    return QuantRows("uint4", g, q, scale.astype(np.float32), offset.astype(np.float32))
