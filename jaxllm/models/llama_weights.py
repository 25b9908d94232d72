"""The parameters of the Llama family (`llama.py`), each described once (see `describe.Param`)."""

from __future__ import annotations

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models.describe import Param, param_index


def qkv_rows(c: ModelConfig) -> np.ndarray:
    """Row order of [q; k; v] (torch layout) grouped by kv head: each kv head's g query heads, its k, its v.

    With KV heads stored in copies (`source_kv_heads`), copy j of the kv heads reads source head j // copies."""
    h, kvh, g, hd = c.num_heads, c.num_kv_heads, c.num_groups, c.head_dim
    src = c.source_kv_heads or kvh
    kv = np.arange(kvh)[:, None, None]
    source_kv = kv // (kvh // src)
    e = np.arange(hd)[None, None, :]
    q = (kv * g + np.arange(g)[None, :, None]) * hd + e
    k = h * hd + source_kv * hd + e
    v = h * hd + src * hd + source_kv * hd + e
    return np.concatenate([q, k, v], axis=1).reshape(-1)


def qkv_source_rows(c: ModelConfig) -> int:
    """Rows of the concatenated q, k and v tensors in the checkpoint."""
    return (c.num_heads + 2 * (c.source_kv_heads or c.num_kv_heads)) * c.head_dim


def gate_up_rows(c: ModelConfig) -> np.ndarray:
    """Row order of [gate; up] as (mlp, 2): gate row f then up row f, so that the MLP axis is major and a
    split of the rows over devices (quantized weights are [N, K]) gives each device its gate and up rows."""
    f = np.arange(c.intermediate_size)
    return np.stack([f, c.intermediate_size + f], axis=1).reshape(-1)


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
_embed = lambda c: (c.hidden_size,)

PARAMS = (
    Param(
        ("embed",),
        ("model.embed_tokens.weight",),
        ("token_embd.weight",),
        "embedding",
        _embed,
        lambda c: (c.vocab_size,),
        ("embed",),
        ("vocab",),
    ),
    Param(("final_norm", "scale"), ("model.norm.weight",), ("output_norm.weight",)),
    Param(
        ("lm_head",),
        ("lm_head.weight",),
        ("output.weight",),
        "matmul",
        _embed,
        lambda c: (c.vocab_size,),
        ("embed",),
        ("vocab",),
    ),
    Param(
        ("layers", "attn_norm", "scale"),
        ("model.layers.{i}.input_layernorm.weight",),
        ("blk.{i}.attn_norm.weight",),
    ),
    Param(
        ("layers", "attn", "qkv"),
        tuple(f"{_ATTN}{p}_proj.weight" for p in "qkv"),
        tuple(f"blk.{{i}}.attn_{p}.weight" for p in "qkv"),
        "matmul",
        _embed,
        lambda c: (c.num_kv_heads, c.num_groups + 2, c.head_dim),
        ("embed",),
        ("kv_heads", None, "head_dim"),
        qkv_rows,
        qkv_source_rows,
    ),
    Param(
        ("layers", "attn", "qkv_bias"),
        tuple(f"{_ATTN}{p}_proj.bias" for p in "qkv"),
        tuple(f"blk.{{i}}.attn_{p}.bias" for p in "qkv"),
        rows=qkv_rows,
        source_rows=qkv_source_rows,
    ),
    Param(
        ("layers", "attn", "o"),
        (f"{_ATTN}o_proj.weight",),
        ("blk.{i}.attn_output.weight",),
        "matmul",
        lambda c: (c.num_heads, c.head_dim),
        _embed,
        ("q_heads", "head_dim"),
        ("embed",),
    ),
    Param(("layers", "attn", "q_norm", "scale"), (f"{_ATTN}q_norm.weight",), ("blk.{i}.attn_q_norm.weight",)),
    Param(("layers", "attn", "k_norm", "scale"), (f"{_ATTN}k_norm.weight",), ("blk.{i}.attn_k_norm.weight",)),
    Param(
        ("layers", "mlp_norm", "scale"),
        ("model.layers.{i}.post_attention_layernorm.weight",),
        ("blk.{i}.ffn_norm.weight",),
    ),
    Param(
        ("layers", "mlp", "gate_up"),
        (f"{_MLP}gate_proj.weight", f"{_MLP}up_proj.weight"),
        ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
        "matmul",
        _embed,
        lambda c: (c.intermediate_size, 2),
        ("embed",),
        ("mlp", None),
        gate_up_rows,
    ),
    Param(
        ("layers", "mlp", "down"),
        (f"{_MLP}down_proj.weight",),
        ("blk.{i}.ffn_down.weight",),
        "matmul",
        lambda c: (c.intermediate_size,),
        _embed,
        ("mlp",),
        ("embed",),
    ),
)

W = param_index(PARAMS)
