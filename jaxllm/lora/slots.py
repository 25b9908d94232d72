"""Adapters served side by side: a fixed number of slots, each row of a batch naming its slot.

Every fused projection that any adapter may target gets a [layers, slots, K, R] and a [layers, slots, R, N]
array (R: the most ranks its parts can take), zero where a slot has no adapter or fewer ranks: zeros add
nothing, so one compiled step serves any set of installed adapters, and installing one changes values,
not shapes. The arrays go to the model as its 'lora' collection (`variables`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.errors import InvalidRequestError
from jaxllm.lora.adapter import Adapter, fuse, part_sizes, targets

NO_ADAPTER = -1  # the slot id of a row without an adapter


def single(adapter: Adapter, cfg: ModelConfig, scan_layers: bool = True) -> dict:
    """One adapter as the model's 'lora' collection with one slot (for training and the pure forward)."""
    fused = {path: {k: v[:, None] for k, v in ab.items()} for path, ab in fuse(adapter, cfg).items()}
    return variables(fused, cfg.num_layers, scan_layers)


def variables(stacked: dict, num_layers: int, scan_layers: bool) -> dict:
    """path -> {"a", "b"} with a leading layer axis, as the 'lora' collection: under the scan the stacks
    themselves ({"layers": {...}}), unrolled one layer's slice per `layers_i` module."""
    if scan_layers:
        return _nest(stacked)
    out = {}
    for i in range(num_layers):
        out.update(
            _nest({(f"layers_{i}", *path[1:]): {k: v[i] for k, v in ab.items()} for path, ab in stacked.items()})
        )
    return out


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


class LoraSlots:
    """Named adapters in `capacity` slots of rank up to `max_rank` per module, on the params' devices.

    `install(name, adapter)` fuses an adapter into a free slot (or the slot of that name); `slot(name)` is the
    id requests carry; `stacked` is what the model reads (see `variables`)."""

    def __init__(self, cfg: ModelConfig, capacity: int = 4, max_rank: int = 16, dtype=jnp.float32, sharding=None):
        if capacity < 1 or max_rank < 1:
            raise InvalidRequestError("LoRA slots need a capacity and a max rank of at least 1")
        self.cfg, self.capacity, self.max_rank, self.dtype = cfg, capacity, max_rank, dtype
        self.names: dict[str, int] = {}
        self._variables: dict[bool, dict] = {}  # per layout, made once per change of the slots
        self.stacked = {}
        for t in targets(cfg).values():
            p = t.param
            if p.path in self.stacked:
                continue
            k, n = part_sizes(cfg, p)[0], math.prod(p.out_dims(cfg))
            rank = max_rank * len(p.hf)
            self.stacked[p.path] = {
                "a": jnp.zeros((cfg.num_layers, capacity, k, rank), dtype),
                "b": jnp.zeros((cfg.num_layers, capacity, rank, n), dtype),
            }
        if sharding is not None:
            self.stacked = jax.device_put(self.stacked, sharding)

    def slot(self, name: str) -> int:
        """The slot of the adapter called `name` (`InvalidRequestError` if none is)."""
        try:
            return self.names[name]
        except KeyError:
            known = ", ".join(self.names) or "none"
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})") from None

    def install(self, name: str, adapter: Adapter) -> int:
        """Put `adapter` in the slot called `name` (replacing it) or in a free one; returns the slot."""
        if adapter.config.rank > self.max_rank:
            raise InvalidRequestError(
                f"adapter {name!r} has rank {adapter.config.rank}; these slots take up to {self.max_rank} "
                "(raise max_lora_rank)"
            )
        slot = self.names.get(name)
        if slot is None:
            free = sorted(set(range(self.capacity)) - set(self.names.values()))
            if not free:
                raise InvalidRequestError(
                    f"all {self.capacity} LoRA slots are taken ({', '.join(self.names)}): remove one or raise max_loras"
                )
            slot = free[0]
        fused = fuse(adapter, self.cfg)
        for path, ab in self.stacked.items():
            a, b = self._padded(fused.get(path), ab)
            ab["a"], ab["b"] = ab["a"].at[:, slot].set(a), ab["b"].at[:, slot].set(b)
        self.names[name] = slot
        self._variables.clear()
        return slot

    def remove(self, name: str) -> None:
        """Empty the adapter's slot (its rows then run the base model)."""
        slot = self.slot(name)
        for ab in self.stacked.values():
            ab["a"], ab["b"] = ab["a"].at[:, slot].set(0), ab["b"].at[:, slot].set(0)
        del self.names[name]
        self._variables.clear()

    def variables(self, scan_layers: bool) -> dict:
        """The 'lora' collection the steps read (unrolled: per-layer slices, cut once, not at every step)."""
        if scan_layers not in self._variables:
            self._variables[scan_layers] = variables(self.stacked, self.cfg.num_layers, scan_layers)
        return self._variables[scan_layers]

    def _padded(self, fused: dict | None, ab: dict):
        """One slot's a [layers, K, R] and b [layers, R, N], the adapter's ranks first, zeros after."""
        a0, b0 = jnp.zeros(ab["a"][:, 0].shape, self.dtype), jnp.zeros(ab["b"][:, 0].shape, self.dtype)
        if fused is None:
            return a0, b0
        r = fused["a"].shape[-1]
        return a0.at[:, :, :r].set(fused["a"].astype(self.dtype)), b0.at[:, :r].set(fused["b"].astype(self.dtype))
