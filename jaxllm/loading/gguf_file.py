"""Read a GGUF file with the `gguf` package: metadata, and tensors in Hugging Face layout, either dequantized
to float32 or repacked losslessly into `QuantRows` (kept quantized)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.errors import ModelLoadError, UnsupportedModelError
from jaxllm.quant import gguf_blocks
from jaxllm.quant.rows import QuantRows

# llama.cpp's converter permutes Q/K rows of these architectures so rotary pairs sit side by side.
PERMUTED_QK_ARCHS = ("llama",)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [n*hd, d] interleaved pairs -> rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(params) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name ("{i}" for the layer) over a family's param description."""
    return {g: h for p in params.values() for h, g in zip(p.hf, p.gguf, strict=True)}


class GGUFFile:
    """Metadata and lazily dequantized tensors of one GGUF file (the file stays memory-mapped)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except FileNotFoundError:
            raise ModelLoadError(f"{path} does not exist") from None
        except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
            raise ModelLoadError(f"{path} is not a readable GGUF file ({e}): it may be corrupt or truncated") from e
        self.path = path
        self.metadata = self._metadata()
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        self.arch = self.metadata.get("general.architecture")

    def _metadata(self) -> dict[str, Any]:
        out = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                out[key] = field.contents()
            except Exception as e:
                raise ModelLoadError(f"GGUF metadata field {key!r} cannot be decoded ({e}): the file is corrupt") from e
        return out

    def use_names(self, gguf_to_hf: dict[str, str]) -> None:
        """Address tensors by Hugging Face names: GGUF name -> HF name ("{i}" for the layer), see `gguf_names`."""
        self._hf_to_gguf = {hf: g for g, hf in gguf_to_hf.items()}

    def _gguf_name(self, hf_name: str) -> str:
        parts = hf_name.split(".")
        if len(parts) > 2 and parts[1] == "layers":
            i = parts[2]
            template = self._hf_to_gguf[".".join(parts[:2] + ["{i}"] + parts[3:])]
            return template.format(i=i)
        return self._hf_to_gguf[hf_name]

    def has(self, hf_name: str) -> bool:
        return self._gguf_name(hf_name) in self.tensors

    def type_name(self, hf_name: str) -> str:
        """The GGML type of the tensor Hugging Face calls `hf_name` ('Q4_1', 'F32', ...)."""
        return self._tensor(hf_name)[1].tensor_type.name

    def _tensor(self, hf_name: str):
        name = self._gguf_name(hf_name)
        if name not in self.tensors:
            raise ModelLoadError(f"tensor {name!r} is missing from {self.path.name}")
        return name, self.tensors[name]

    def _qk_heads(self, hf_name: str) -> int | None:
        """The head count whose Q/K row permutation llama.cpp applied to this tensor, or None."""
        if self.arch not in PERMUTED_QK_ARCHS or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        key = "attention.head_count" if "q_proj" in hf_name else "attention.head_count_kv"
        return int(self.metadata.get(f"{self.arch}.{key}") or self.metadata[f"{self.arch}.attention.head_count"])

    def read_rows(self, hf_name: str) -> QuantRows:
        """The tensor as stored, repacked losslessly into QuantRows [out, in] (Hugging Face row order).

        Raises UnsupportedModelError for F32 tensors and block types without a repacking."""
        name, t = self._tensor(hf_name)
        kind = t.tensor_type.name
        if kind not in gguf_blocks.KEPT_TYPES:
            raise UnsupportedModelError(
                f"GGUF tensor {name} has type {kind}, which cannot be kept quantized: load it with dequantize=True"
            )
        shape = tuple(int(n) for n in reversed(t.shape))
        rows = gguf_blocks.repack(t.data, kind, int(np.prod(shape[:-1])), shape[-1])
        heads = self._qk_heads(hf_name)
        if heads is not None:
            rows = rows.take(_unpermute(np.arange(shape[0]), heads))
        return rows

    def read(self, hf_name: str) -> np.ndarray:
        """The tensor Hugging Face calls `hf_name`, dequantized to float32 in Hugging Face layout."""
        from gguf import quants

        name, t = self._tensor(hf_name)
        try:
            w = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"GGUF tensor type {t.tensor_type.name} (in {name}) is not supported") from None
        shape = tuple(int(n) for n in reversed(t.shape))
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        heads = self._qk_heads(hf_name)
        if heads is not None:
            w = _unpermute(w, heads)
        return w
