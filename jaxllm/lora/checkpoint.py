"""Adapters saved and restored with `orbax-checkpoint` (the weights pytree, the LoRA config in its metadata)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxllm.errors import InvalidRequestError
from jaxllm.lora.adapter import Adapter, LoraConfig


def save_adapter(adapter: Adapter, path) -> Path:
    """Write the adapter as an orbax checkpoint at `path` (a new directory; an existing one is replaced)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    config = dataclasses.asdict(adapter.config)
    config["targets"] = list(config["targets"])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, adapter.weights, force=True, custom_metadata={"lora_config": config})
        ckpt.wait_until_finished()
    return path


def load_adapter(path) -> Adapter:
    """The adapter an earlier `save_adapter` wrote at `path`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise InvalidRequestError(f"{path} is not an adapter checkpoint directory")
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        config = (meta.custom_metadata or {}).get("lora_config")
        if config is None:
            raise InvalidRequestError(f"{path} is an orbax checkpoint without a LoRA config: not a saved adapter")
        weights = ckpt.restore(path)
    weights = {m: {k: np.asarray(v) for k, v in ab.items()} for m, ab in weights.items()}
    return Adapter(weights, LoraConfig(**{**config, "targets": tuple(config["targets"])}))
