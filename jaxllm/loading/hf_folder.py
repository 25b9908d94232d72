"""Read a local Hugging Face model folder: config.json, safetensors (single or sharded), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm.errors import ModelLoadError


class SafetensorsReader:
    """Name -> array over one or many memory-mapped safetensors files (Hugging Face layout)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ModelLoadError(f"no *.safetensors weights in {folder}: download or convert the weights first")
        self._handles = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise ModelLoadError(f"{path} is listed in the safetensors index but missing")
            try:
                # The "flax" framework reads bfloat16, which plain numpy cannot.
                self._handles[name] = safe_open(str(path), framework="flax")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{path} is not a readable safetensors file ({e})") from e
        self._where = weight_map or {k: n for n, h in self._handles.items() for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ModelLoadError(f"tensor {name!r} is missing from the safetensors files")
        try:
            return np.asarray(self._handles[self._where[name]].get_tensor(name))
        except SafetensorError as e:
            raise ModelLoadError(f"tensor {name!r} cannot be read ({e}): the file may be truncated") from e
