"""Read a sentence-transformers folder: the pipeline (pooling, normalisation, length) and, for an encoder, the model.

A sentence-transformers folder has `modules.json` listing its modules: a Transformer (the model's own
folder, with `config.json`, the weights, `tokenizer.json` and `sentence_bert_config.json` giving
`max_seq_length` and `do_lower_case`), a Pooling (its `config.json` names the mode) and optionally a
Normalize. A plain Hugging Face folder has no `modules.json`: it gets the defaults of its kind (`defaults`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp

from jaxllm.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from jaxllm.loading.hf_folder import SafetensorsReader
from jaxllm.loading.resolve import resolve_model
from jaxllm.loading.weights import assemble_params
from jaxllm.models import bert
from jaxllm.tokenizer import Tokenizer

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
# sentence-transformers' names (its config's `pooling_mode` values and legacy boolean keys) -> ours
_ALIASES = {"mean_sqrt_len_tokens": "mean_sqrt_len", "last": "lasttoken", "last_token": "lasttoken"}
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Encoder families, beyond those `models.bert` runs, recognised so that they are refused as encoders.
ENCODER_MODEL_TYPES = (*bert.MODEL_TYPES, "distilbert", "mpnet", "electra", "albert", "deberta", "deberta-v2")
_ENCODER_ARCH_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "Camembert", "DistilBert", "MPNet", "Electra", "Albert")
_WEIGHT_PREFIXES = ("", "bert.", "roberta.", "model.")


def pooling_mode(name: str) -> str:
    """A pooling mode's canonical name (one of POOLING_MODES; sentence-transformers' spellings accepted)."""
    mode = _ALIASES.get(name, name)
    if mode not in POOLING_MODES:
        raise InvalidRequestError(f"pooling {name!r} is not one of {', '.join(POOLING_MODES)}", "pooling")
    return mode


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How token states become a sentence vector. model_dir: the folder holding the model's `config.json` (None:
    not known); max_seq_length: the longest input the folder declares (None: the model's own limit)."""

    model_dir: Path | None
    pooling: str
    normalize: bool
    max_seq_length: int | None = None
    do_lower_case: bool = False


def defaults(folder: Path | None, encoder: bool) -> SentenceConfig:
    """A folder without `modules.json`: an encoder pools the mean of its tokens, a decoder its last token;
    both are normalised."""
    return SentenceConfig(folder, "mean" if encoder else "lasttoken", True)


def read_sentence_config(folder: Path, encoder: bool) -> SentenceConfig:
    """The pipeline of `folder` from its `modules.json` (Transformer, Pooling, Normalize), or `defaults`."""
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return defaults(folder, encoder)
    modules = _json(modules_path)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path} is not a list of modules")
    by_kind: dict[str, dict] = {}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in ("Transformer", "Pooling", "Normalize"):
            raise UnsupportedModelError(f"sentence-transformers module {m.get('type')!r} in {folder} is not supported")
        by_kind[kind] = m
    if "Transformer" not in by_kind:
        raise ModelLoadError(f"{modules_path} lists no Transformer module")
    model_dir = folder / by_kind["Transformer"].get("path", "")
    sbert_path = model_dir / "sentence_bert_config.json"
    sbert = _json(sbert_path) if sbert_path.exists() else {}
    pooling = defaults(folder, encoder).pooling
    if "Pooling" in by_kind:
        pooling = _pooling_from(folder / by_kind["Pooling"].get("path", ""), pooling)
    length = sbert.get("max_seq_length")
    return SentenceConfig(
        model_dir,
        pooling,
        "Normalize" in by_kind,
        int(length) if length else None,
        bool(sbert.get("do_lower_case", False)),
    )


def _pooling_from(pooling_dir: Path, default: str) -> str:
    """The one pooling mode of a Pooling module's `config.json` (`pooling_mode`, or the legacy boolean keys)."""
    path = pooling_dir / "config.json"
    cfg = _json(path) if path.exists() else {}
    given = cfg.get("pooling_mode")
    if given is None:
        modes = [mode for key, mode in _LEGACY_KEYS.items() if cfg.get(key)]
        given = modes or ([default] if not path.exists() else ["mean"])
    modes = [given] if isinstance(given, str) else list(given)
    if len(modes) != 1:
        raise UnsupportedModelError(f"{path} concatenates pooling modes {modes}: only one mode is supported")
    try:
        return pooling_mode(modes[0])
    except InvalidRequestError:
        raise UnsupportedModelError(f"{path}: pooling mode {modes[0]!r} is not supported") from None


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg})") from e


def _hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: a Hugging Face model folder needs a config.json")
    return _json(path)


def encoder_dir(folder: Path) -> Path:
    """The folder of the model's own `config.json`: the Transformer module's when `modules.json` names one."""
    modules = folder / "modules.json"
    if modules.exists():
        for m in _json(modules):
            if str(m.get("type", "")).endswith("Transformer"):
                return folder / m.get("path", "")
    return folder


def is_encoder_folder(folder: Path) -> bool:
    """Whether the model of `folder` is an encoder of the BERT family (by `model_type` or architecture)."""
    path = encoder_dir(folder) / "config.json"
    if not path.exists():
        return False
    raw = _json(path)
    if raw.get("model_type") in ENCODER_MODEL_TYPES:
        return True
    return any(
        a.startswith(_ENCODER_ARCH_PREFIXES) and a.endswith(("Model", "ForMaskedLM"))
        for a in raw.get("architectures") or ()
    )


@dataclasses.dataclass
class LoadedEncoder:
    """An encoder ready to embed: its config, Flax module, params, tokenizer and pipeline; max_len: the longest
    input (tokens, with the special ones) that it takes."""

    name: str
    config: bert.BertConfig
    model: bert.Encoder
    params: dict
    tokenizer: Tokenizer
    sentence: SentenceConfig
    max_len: int


def model_folder(ref: str | os.PathLike) -> tuple[Path, str]:
    """(folder, name) of a model reference: a folder as it is, else what `resolve_model` finds (a hub id)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path, path.name
    files = resolve_model(ref)
    if files.kind != "hf":
        raise UnsupportedModelError(f"{files.path} is a GGUF file: an encoder loads from a model folder")
    return files.path, files.name


def load_encoder(ref: str | os.PathLike, progress: bool = False) -> LoadedEncoder:
    """Load a BERT-family encoder, float32, with its sentence-transformers pipeline, from a folder or hub id."""
    folder, name = model_folder(ref)
    sentence = read_sentence_config(folder, encoder=True)
    raw = _hf_config(sentence.model_dir)
    if not is_encoder_folder(folder):
        raise UnsupportedModelError(
            f"{folder} holds a {raw.get('model_type')!r} model, not an encoder: serve it with LLM(...).embed"
        )
    cfg = bert.BertConfig.from_hf(raw)
    reader = SafetensorsReader(sentence.model_dir)
    prefix = next((p for p in _WEIGHT_PREFIXES if reader.has(f"{p}embeddings.word_embeddings.weight")), None)
    if prefix is None:
        raise ModelLoadError(f"no embeddings.word_embeddings.weight in the safetensors of {sentence.model_dir}")
    model = bert.Encoder(cfg)
    params = assemble_params(
        cfg,
        bert.param_shapes(model),
        bert.W,
        lambda n: reader.read(prefix + n),
        jnp.float32,
        progress=progress,
        desc=f"loading {name}",
    )
    limit = min(sentence.max_seq_length or cfg.max_len, cfg.max_len)
    tokenizer = encoder_tokenizer(sentence.model_dir, sentence.do_lower_case)
    return LoadedEncoder(name, cfg, model, params, tokenizer, sentence, limit)


def encoder_tokenizer(folder: Path, lower_case: bool) -> Tokenizer:
    """The folder's tokenizer without the padding and truncation a `tokenizer.json` may carry (inputs are padded
    here, and too long ones refused); lower-casing first when sentence-transformers' `do_lower_case` asks."""
    from tokenizers import normalizers

    tok = Tokenizer.from_hf_folder(folder)
    tok.backend.no_padding()
    tok.backend.no_truncation()
    if lower_case:
        existing = tok.backend.normalizer
        tok.backend.normalizer = (
            normalizers.Sequence([normalizers.Lowercase(), existing]) if existing else normalizers.Lowercase()
        )
    return tok
