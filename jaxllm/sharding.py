"""Logical axis names and their mapping to mesh axes: the one place where sharding is decided.

Model code names the axes of every parameter and activation with the logical names below; the
rules map those names to mesh axes. On one device every rule resolves to replication.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "seq", "layers", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "vocab")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis (or None: replicated) each logical axis is split over."""

    batch: str | None = "data"
    seq: str | None = None
    layers: str | None = None
    embed: str | None = None
    q_heads: str | None = "model"
    kv_heads: str | None = "model"
    head_dim: str | None = None
    mlp: str | None = "model"
    vocab: str | None = "model"

    def as_flax_rules(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((name, getattr(self, name)) for name in LOGICAL_AXES)

    def spec(self, logical: tuple[str | None, ...]) -> PartitionSpec:
        """The PartitionSpec for an array with these logical axes; refuses one mesh axis used twice."""
        mesh_axes = [getattr(self, name) if name else None for name in logical]
        used = [a for a in mesh_axes if a is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {logical} map two dimensions onto one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A 2-D ('data', 'model') mesh over the first data*model devices."""
    devices = list(devices if devices is not None else jax.devices())[: data * model]
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def param_shardings(boxed_shapes, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """NamedShardings for a tree of `nn.Partitioned`-boxed shapes (as from `jax.eval_shape(init)`)."""

    def one(leaf):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(leaf.shape)
        return NamedSharding(mesh, rules.spec(tuple(names)))

    return jax.tree.map(one, boxed_shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
