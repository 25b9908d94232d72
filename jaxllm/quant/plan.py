"""Which parameters of a model are stored quantized, and how: a static plan handed to the model and loader."""

from __future__ import annotations

import dataclasses

from jaxllm.quant.rows import Format


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Param path (as in the family's description, 'layers' for every layer) -> storage format.

    Paths absent from the plan are float. Hashable, so that it can be a static attribute of a model."""

    formats: tuple[tuple[tuple[str, ...], Format], ...] = ()

    def get(self, path: tuple[str, ...]) -> Format | None:
        return dict(self.formats).get(tuple(path))

    def __bool__(self) -> bool:
        return bool(self.formats)

    def describe(self) -> str:
        """One line: 'layers/attn/qkv uint4/g32+offset, ...'."""
        one = lambda p, f: f"{'/'.join(p)} {f.kind}/g{f.group or 'row'}{'+offset' if f.offset else ''}"
        return ", ".join(one(p, f) for p, f in self.formats)
