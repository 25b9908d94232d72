"""LoRA adapters: the pytree, PEFT folders and orbax checkpoints, and slots for serving several at once."""

from __future__ import annotations

from pathlib import Path

from jaxllm.config import ModelConfig
from jaxllm.lora.adapter import Adapter, LoraConfig, fuse, init
from jaxllm.lora.checkpoint import load_adapter, save_adapter
from jaxllm.lora.peft import load_peft, save_peft
from jaxllm.lora.slots import NO_ADAPTER, LoraSlots


def read_adapter(path, cfg: ModelConfig) -> Adapter:
    """An adapter from a PEFT folder (`adapter_config.json` present) or an orbax checkpoint (`save_adapter`)."""
    return load_peft(path, cfg) if (Path(path) / "adapter_config.json").is_file() else load_adapter(path)


__all__ = [
    "NO_ADAPTER",
    "Adapter",
    "LoraConfig",
    "LoraSlots",
    "fuse",
    "init",
    "load_adapter",
    "load_peft",
    "read_adapter",
    "save_adapter",
    "save_peft",
]
