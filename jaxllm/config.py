"""The frozen model configuration, read from a Hugging Face `config.json` or GGUF metadata.

The config is hashable so that it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxllm.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Hugging Face `model_type` -> the family implementation in `jaxllm.models`.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Llama-family forward pass needs to know about a model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The checkpoint's KV heads, when each is stored num_kv_heads // source_kv_heads times over (tensor
    # parallelism over more devices than KV heads: `sharding.shard_config`); None: num_kv_heads.
    source_kv_heads: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}): the config is inconsistent"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_scaling.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_hf(raw: dict) -> tuple[float, RopeScaling]:
    """Read rope theta and scaling from either transformers 4.x or 5.x field names."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    # transformers 5 writes `rope_parameters`; older files (or hand edits) put the scaling in `rope_scaling`.
    if params.get("rope_type", "default") != "default":
        merged = {**scaling, **params}
    else:
        merged = {**params, **scaling}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in merged.items() if k in fields and k != "rope_type"}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def config_from_hf_dict(raw: dict, generation_config: dict | None = None) -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face `config.json` (and `generation_config.json`)."""
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        archs = raw.get("architectures") or [model_type]
        raise UnsupportedModelError(
            f"architecture {archs[0]!r} (model_type {model_type!r}) is not supported "
            f"(supported model types: {', '.join(HF_MODEL_TYPES)})"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        theta, scaling = _rope_from_hf(raw)
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
        sliding = raw.get("sliding_window") if model_type == "mistral" else None
        eos = (generation_config or {}).get("eos_token_id", raw.get("eos_token_id"))
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_tuple(eos),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks the field {e.args[0]!r}: the model folder is incomplete") from e
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json has a malformed value: {e}") from e


def load_hf_config(folder: Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` when present) from a model folder."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path} is missing: a Hugging Face model folder needs a config.json") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path.name} in {folder} is not valid JSON ({e.msg})") from e
    return config_from_hf_dict(raw, gen)


GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_gguf_metadata(meta: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from GGUF key/value metadata (`{arch}.block_count`, ...)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    try:
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv = get("attention.head_count_kv", heads)
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
        scaling = RopeScaling()
        stype = get("rope.scaling.type")
        if stype == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor", 1.0)))
        elif stype not in (None, "none"):
            raise UnsupportedModelError(f"GGUF rope scaling {stype!r} is not supported")
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        window = get("attention.sliding_window")
        return ModelConfig(
            model_type=GGUF_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=False,  # decided by the loader: no output.weight means tied
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            sliding_window=int(window) if window else None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_eos_tuple(eos),
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"GGUF metadata is missing or malformed ({e}): the file may be corrupt") from e
