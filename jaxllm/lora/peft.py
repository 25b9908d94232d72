"""PEFT-format adapter folders (`adapter_config.json` + `adapter_model.safetensors`), read and written.

The keys are PEFT's for a causal LM: `base_model.model.<module path>.lora_A.weight` [rank, in] and
`...lora_B.weight` [out, rank], the module path being the checkpoint's own
(`model.layers.{i}.self_attn.q_proj`). Only what the engine runs exactly is accepted: plain LoRA on the
decoder layers' projections with one rank and alpha, no bias, no DoRA, no extra trained modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxllm.config import ModelConfig
from jaxllm.errors import InvalidRequestError
from jaxllm.lora.adapter import Adapter, LoraConfig, check_targets, targets

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def load_peft(folder, cfg: ModelConfig, dtype=jnp.float32) -> Adapter:
    """The adapter in a PEFT folder, for a model of config `cfg` (`InvalidRequestError` saying what does not
    fit: a missing file, a setting the engine does not run, a module or shape this model does not have)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise InvalidRequestError(f"{folder} is not a PEFT adapter folder: it needs {CONFIG} and {WEIGHTS}")
    meta = json.loads((folder / CONFIG).read_text())
    config = _config(meta, folder)
    check_targets(cfg, config.targets)
    tensors = load_file(folder / WEIGHTS)
    known, weights = targets(cfg), {}
    for name in config.targets:
        t = known[name]
        a, b = [], []
        for i in range(cfg.num_layers):
            module = PREFIX + t.name.format(i=i).removesuffix(".weight")
            a.append(_tensor(tensors, f"{module}.lora_A.weight", folder).T)
            b.append(_tensor(tensors, f"{module}.lora_B.weight", folder).T)
        a, b = np.stack(a), np.stack(b)
        if a.shape[2] != config.rank or b.shape[1] != config.rank:
            raise InvalidRequestError(f"{folder}: {name} has rank {a.shape[2]}, the config says r={config.rank}")
        weights[name] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
    return Adapter(weights, config)


def save_peft(adapter: Adapter, folder, cfg: ModelConfig, base_model: str | None = None) -> Path:
    """Write `adapter` as a PEFT folder that `peft.PeftModel.from_pretrained` loads onto the same base."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    known, tensors = targets(cfg), {}
    for name, w in adapter.weights.items():
        a, b = np.asarray(w["a"], np.float32), np.asarray(w["b"], np.float32)
        for i in range(cfg.num_layers):
            module = PREFIX + known[name].name.format(i=i).removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, folder / WEIGHTS)
    c = adapter.config
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "target_modules": sorted(adapter.weights),
        "use_rslora": c.rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))
    return folder


def _config(meta: dict, folder: Path) -> LoraConfig:
    if meta.get("peft_type", "LORA") != "LORA":
        raise InvalidRequestError(f"{folder}: peft_type {meta.get('peft_type')!r} is not LORA")
    unsupported = {
        "bias": meta.get("bias", "none") != "none",
        "use_dora": bool(meta.get("use_dora")),
        "fan_in_fan_out": bool(meta.get("fan_in_fan_out")),
        "modules_to_save": bool(meta.get("modules_to_save")),
        "rank_pattern": bool(meta.get("rank_pattern")),
        "alpha_pattern": bool(meta.get("alpha_pattern")),
        "layers_to_transform": meta.get("layers_to_transform") is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise InvalidRequestError(f"{folder}: adapters with {', '.join(bad)} set are not supported (plain LoRA only)")
    modules = meta.get("target_modules") or []
    if isinstance(modules, str):
        raise InvalidRequestError(f"{folder}: target_modules as a pattern ({modules!r}) is not supported: list them")
    return LoraConfig(
        int(meta["r"]), float(meta.get("lora_alpha", meta["r"])), tuple(modules), bool(meta.get("use_rslora"))
    )


def _tensor(tensors: dict, key: str, folder: Path) -> np.ndarray:
    try:
        return tensors[key].astype(np.float32)
    except KeyError:
        raise InvalidRequestError(f"{folder}: {WEIGHTS} has no tensor {key}") from None
