"""Which params a loaded model keeps quantized: from a GGUF file's tensor types, or from an ISQ scheme."""

from __future__ import annotations

import math

from jaxllm.config import ModelConfig
from jaxllm.errors import QuantizationError, UnsupportedModelError
from jaxllm.models.describe import Param
from jaxllm.quant import gguf_blocks
from jaxllm.quant.isq import IsqScheme
from jaxllm.quant.plan import QuantPlan
from jaxllm.quant.rows import common_format

EMBEDDING_PATHS = (("embed",), ("lm_head",))


def _present(params: dict[tuple[str, ...], Param], cfg: ModelConfig):
    """The quantizable params this config's model has (no LM head when it is tied to the embedding)."""
    for p in params.values():
        if p.quantizable and not (p.path == ("lm_head",) and cfg.tie_word_embeddings):
            yield p


def gguf_plan(gguf, params: dict[tuple[str, ...], Param], cfg: ModelConfig) -> QuantPlan:
    """Each quantizable param in the narrowest format holding all of its GGUF sources exactly (over every
    layer: stacked layers share one format). A param stays a float param (compute dtype) when a source is
    F32, or when float sources (F16, BF16) mix with other types, which no one stored format holds exactly."""
    formats = []
    for p in _present(params, cfg):
        layers = range(cfg.num_layers) if p.per_layer else [None]
        types = {}
        for i in layers:
            for name in p.sources(i):
                types.setdefault(gguf.type_name(name), name)
        for t, name in types.items():
            if t not in gguf_blocks.KEPT_TYPES and t != "F32":
                raise UnsupportedModelError(
                    f"GGUF tensor {name} has type {t}, which jaxllm cannot keep quantized: load it with "
                    f"dequantize=True (--dequantize), or use a file in {', '.join(gguf_blocks.DECODERS)}"
                )
        if "F32" in types:
            continue
        try:
            fmt = common_format(gguf_blocks.block_format(t) for t in types)
        except ValueError:
            continue
        formats.append((p.path, fmt))
    return QuantPlan(tuple(formats))


def isq_plan(
    scheme: IsqScheme, params: dict[tuple[str, ...], Param], cfg: ModelConfig, quant_embeddings: bool = False
) -> QuantPlan:
    """Every matmul weight in the scheme's format; the embedding and LM head too when `quant_embeddings`."""
    formats = []
    for p in _present(params, cfg):
        if p.path in EMBEDDING_PATHS and not quant_embeddings:
            continue
        k = math.prod(p.in_dims(cfg))
        if scheme.group and k % scheme.group:
            raise QuantizationError(
                f"int4 groups of {scheme.group} do not divide the {k} inputs of {p.name}: "
                f"choose a group that does (e.g. int4-g32)"
            )
        formats.append((p.path, scheme.format))
    return QuantPlan(tuple(formats))
