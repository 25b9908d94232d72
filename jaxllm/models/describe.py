"""How a model family describes its parameters: once, with everything derived from the description.

A `Param` names a parameter's Flax path, its logical shape and axes, and where it comes from in a
checkpoint (Hugging Face and GGUF tensor names, and the order of the source rows). The model builds its
params from it (`layers.weight`), `eval_shape` and the shardings follow from those, and the loader reads
the checkpoint with it, float or quantized alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxllm.config import ModelConfig

Dims = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a family.

    path: its path under params/, with 'layers' first for per-layer params (stacked under the scan, or
    `layers_<i>` unrolled). hf, gguf: the source tensors, "{i}" standing for the layer; several sources
    are concatenated along their rows (torch layout [out, in]). kind: "matmul" (float layout [*in, *out],
    contracted over `in`), "embedding" (float layout [*out, *in]: rows are looked up, and a tied LM head
    contracts over `in`) or "vector" (norm scales and biases: shape from the model, never quantized).
    rows: the order of the concatenated source rows that gives the out dims in their logical order
    (None: as they come); an index may repeat (a KV head stored in copies). source_rows: how many rows
    the sources hold together (None: as many as the out dims).
    """

    path: tuple[str, ...]
    hf: tuple[str, ...]
    gguf: tuple[str, ...]
    kind: str = "vector"
    in_dims: Dims | None = None
    out_dims: Dims | None = None
    in_axes: tuple[str | None, ...] = ()
    out_axes: tuple[str | None, ...] = ()
    rows: Callable[[ModelConfig], np.ndarray] | None = None
    source_rows: Callable[[ModelConfig], int] | None = None

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"

    @property
    def quantizable(self) -> bool:
        return self.kind in ("matmul", "embedding")

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def sources(self, layer: int | None) -> list[str]:
        """The source tensors' Hugging Face names (every reader is addressed by them), for `layer` when per-layer."""
        return [n.format(i=layer) for n in self.hf]

    def float_layout(self, rows: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """Concatenated, reordered source rows [N, K] -> this param's float array."""
        if self.kind == "vector":
            return rows
        ins, outs = self.in_dims(cfg), self.out_dims(cfg)
        w = rows.reshape(*outs, *ins)
        if self.kind == "embedding":
            return w
        return np.transpose(w, [*range(len(outs), len(outs) + len(ins)), *range(len(outs))])


def param_index(params: tuple[Param, ...]) -> dict[tuple[str, ...], Param]:
    return {p.path: p for p in params}
