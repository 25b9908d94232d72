"""One entry point: a model reference in, a config, params and tokenizer out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from jaxllm.chat_template import read_template_file
from jaxllm.config import ModelConfig, config_from_gguf_metadata, load_hf_config
from jaxllm.loading.gguf_file import GGUFFile
from jaxllm.loading.hf_folder import SafetensorsReader
from jaxllm.loading.resolve import ModelFiles, resolve_model
from jaxllm.loading.weights import assemble_params
from jaxllm.models.registry import build_model, param_shapes
from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    """What a loader produces: enough to run and to talk to the model."""

    name: str
    config: ModelConfig
    model: object
    params: dict
    tokenizer: Tokenizer


def load_model(
    ref=None,
    dtype=jnp.float32,
    chat_template: str | Path | None = None,
    progress: bool = True,
    scan_layers: bool = True,
) -> LoadedModel:
    """Load a model from an alias ('smollm2'), a .gguf file, a Hugging Face folder or hub id.

    scan_layers: stacked params under a layer scan, or per-layer params run unrolled (see
    `jaxllm.models.registry.build_model`)."""
    files = resolve_model(ref)
    if files.kind == "gguf":
        cfg, model, params, tok = _load_gguf(files, dtype, progress, scan_layers)
    else:
        cfg, model, params, tok = _load_hf(files, dtype, progress, scan_layers)
    if chat_template is not None:
        tok.chat_template = read_template_file(chat_template)
    return LoadedModel(files.name, cfg, model, params, tok)


def _load_hf(files: ModelFiles, dtype, progress, scan_layers):
    cfg = load_hf_config(files.path)
    reader = SafetensorsReader(files.path)
    if not reader.has("lm_head.weight") and not cfg.tie_word_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    tok = Tokenizer.from_hf_folder(files.path)
    if tok.eos_id is not None and tok.eos_id not in cfg.eos_token_ids:
        cfg = dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + (tok.eos_id,))
    model = build_model(cfg, dtype, scan_layers)
    params = assemble_params(cfg, param_shapes(model), reader.read, dtype, progress, f"loading {files.name}")
    return cfg, model, params, tok


def _load_gguf(files: ModelFiles, dtype, progress, scan_layers):
    gguf = GGUFFile(files.path)
    cfg = config_from_gguf_metadata(gguf.metadata)
    if not gguf.has("lm_head.weight"):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    tok = Tokenizer.from_gguf_metadata(gguf.metadata)
    model = build_model(cfg, dtype, scan_layers)
    params = assemble_params(cfg, param_shapes(model), gguf.read, dtype, progress, f"loading {files.name}")
    return cfg, model, params, tok
