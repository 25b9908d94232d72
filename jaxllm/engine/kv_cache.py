"""The paged KV cache on device: per layer, one pool of fixed-size pages shared by all sequences.

Which page holds which positions of which sequence is the allocator's business
(`jaxllm.engine.kv_pages`); the device side only sees block tables: [rows, n_pages] page ids, where
page j of a row holds its positions [j * page_size, (j + 1) * page_size). Ids >= num_pages mark
"no page": writes there are dropped and reads are masked. A contiguous cache is the special case
of one page of `max_len` tokens per sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm import sharding
from jaxllm.config import ModelConfig
from jaxllm.sharding import Placement


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: [layers, num_pages, page_size, kv_heads, head_dim] (stacked, for models that scan their
    layers), or tuples of one [num_pages, page_size, kv_heads, head_dim] array per layer (for unrolled
    models: each layer reads and writes its own buffer, so XLA never copies a layer's slice)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(
        cls,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype=jnp.float32,
        per_layer: bool = False,
        placement: Placement | None = None,
    ) -> KVCache:
        """A zeroed pool; under a placement, sharded over KV heads (each device holds its heads' pages) and over
        the data-parallel replicas (each holds num_pages / replicas pages)."""
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        logical = ("pages", None, "kv_heads", "head_dim")
        if not per_layer:
            shape, logical = (cfg.num_layers, *shape), ("layers", *logical)
        device = placement.sharding(logical) if placement else None
        z = lambda: jnp.zeros(shape, dtype, device=device)
        if per_layer:
            return cls(tuple(z() for _ in range(cfg.num_layers)), tuple(z() for _ in range(cfg.num_layers)))
        return cls(z(), z())

    @property
    def num_pages(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-4]  # stacked or per layer, the pool is the last 4 dims

    @property
    def page_size(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-3]

    def write(self, block_tables, positions, k_new, v_new) -> KVCache:
        """Scatter k_new, v_new [layers, batch, seq, kv_heads, head_dim] at positions [batch, seq] of each row.

        block_tables: [batch, n_pages] int32. Positions past the table, or on a "no page" entry
        (padding rows, bucket padding), are dropped. Under a placement each device writes its own heads and,
        with data-parallel replicas, its replica's rows into its replica's pages (the block tables hold page
        ids of the row's replica, as `kernels.paged_attention` reads them).
        """
        placement = sharding.active()
        if placement is None or placement.mesh.size == 1:
            return self._write(block_tables, positions, k_new, v_new)
        rows = sharding.rows_axis(placement, positions.shape[0], paged=True)
        pool = sharding.pool_spec(placement, 4 if isinstance(self.k, tuple) else 5)  # covers each layer of a tuple
        cache_spec = KVCache(pool, pool)
        new = P(None, rows, None, placement.rules.kv_heads, None)
        run = jax.shard_map(
            lambda c, *a: c._write(*a),
            mesh=placement.mesh,
            in_specs=(cache_spec, P(rows), P(rows), new, new),
            out_specs=cache_spec,
            check_vma=False,
        )
        return run(self, block_tables, positions, k_new, v_new)

    def _write(self, block_tables, positions, k_new, v_new) -> KVCache:
        page_of = positions // self.page_size
        n = block_tables.shape[1]
        page = jnp.take_along_axis(block_tables, jnp.minimum(page_of, n - 1), axis=1)
        page = jnp.where(page_of < n, page, self.num_pages)
        if isinstance(self.k, tuple):
            idx = (page, positions % self.page_size)
            return KVCache(
                tuple(k.at[idx].set(kn.astype(k.dtype), mode="drop") for k, kn in zip(self.k, k_new, strict=True)),
                tuple(v.at[idx].set(vn.astype(v.dtype), mode="drop") for v, vn in zip(self.v, v_new, strict=True)),
            )
        idx = (slice(None), page, positions % self.page_size)
        return KVCache(
            self.k.at[idx].set(k_new.astype(self.k.dtype), mode="drop"),
            self.v.at[idx].set(v_new.astype(self.v.dtype), mode="drop"),
        )


def bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """KV cache bytes one token takes over all layers (keys and values)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
