"""Layers shared by the model families: RMSNorm, rotary embeddings, gated MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxllm.config import ModelConfig


def param(module: nn.Module, name: str, shape, axes: tuple[str, ...], init=None, dtype=jnp.float32):
    """A parameter with logical axis names attached (the single description of that array)."""
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32: x[..., d] -> [..., d]."""

    eps: float
    axis_name: str = "embed"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions, inv_freq: np.ndarray):
    """cos, sin tables [batch, seq, head_dim] for integer positions [batch, seq] (rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate x [batch, seq, heads, head_dim] by cos/sin [batch, seq, head_dim] (Hugging Face layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); x [batch, seq, embed]."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, f = self.cfg.hidden_size, self.cfg.intermediate_size
        # gate and up in one matmul: fewer, larger dots read the weights faster on every backend.
        gate_up = param(self, "gate_up", (d, 2, f), ("embed", None, "mlp"), dtype=self.dtype)
        down = param(self, "down", (f, d), ("mlp", "embed"), dtype=self.dtype)
        gu = jnp.einsum("btd,dcf->btcf", x, gate_up)
        return (nn.silu(gu[:, :, 0]) * gu[:, :, 1]) @ down
