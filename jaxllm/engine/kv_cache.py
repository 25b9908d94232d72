"""A contiguous KV cache: one row of `max_len` slots per sequence slot, for every layer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: [layers, slots, max_len, kv_heads, head_dim]; slot s holds one sequence, position p at index p."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def write(self, slot_ids, positions, k_new, v_new) -> KVCache:
        """Scatter k_new, v_new [layers, batch, seq, kv_heads, head_dim] at (slot_ids[b], positions[b, t]).

        slot_ids None means batch row b is slot b. Positions past max_len (bucket padding) are dropped.
        """
        b = positions.shape[0]
        rows = jnp.arange(b) if slot_ids is None else slot_ids
        idx = (slice(None), rows[:, None], positions)
        return KVCache(
            self.k.at[idx].set(k_new.astype(self.k.dtype), mode="drop"),
            self.v.at[idx].set(v_new.astype(self.v.dtype), mode="drop"),
        )
