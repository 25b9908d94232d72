"""Assemble the Flax param tree (stacked or per-layer) from per-tensor reads, shared by every file format.

Each parameter is described once in `PARAM_TABLE`: its Flax path, its Hugging Face and GGUF
names, and how a [out, in] torch-layout matrix becomes our layout. A format only provides
`read(hf_name) -> np.ndarray` (Hugging Face layout, any float dtype) and `has(hf_name)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.errors import ModelLoadError


def _out_proj(ws, c: ModelConfig):
    """o_proj [d, heads*hd] -> [heads, hd, d]."""
    (w,) = ws
    return w.T.reshape(c.num_heads, c.head_dim, w.shape[0])


def _qkv(ws, c: ModelConfig):
    """q [heads*hd, d], k, v [kv_heads*hd, d] -> [d, kv_heads, groups + 2, hd] (each group: its q heads, k, v)."""
    q, k, v = ws
    d = q.shape[1]
    kvh, g, hd = c.num_kv_heads, c.num_groups, c.head_dim
    parts = [q.T.reshape(d, kvh, g, hd), k.T.reshape(d, kvh, 1, hd), v.T.reshape(d, kvh, 1, hd)]
    return np.concatenate(parts, axis=2)


def _qkv_bias(ws, c: ModelConfig):
    """q bias [heads*hd], k, v biases [kv_heads*hd] -> [kv_heads, groups + 2, hd]."""
    q, k, v = ws
    kvh, g, hd = c.num_kv_heads, c.num_groups, c.head_dim
    return np.concatenate([q.reshape(kvh, g, hd), k.reshape(kvh, 1, hd), v.reshape(kvh, 1, hd)], axis=1)


def _gate_up(ws, c: ModelConfig):
    """gate, up [mlp, d] -> [d, 2, mlp]."""
    return np.stack([ws[0].T, ws[1].T], axis=1)


_T = lambda ws, c: ws[0].T
_SAME = lambda ws, c: ws[0]

_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
# Flax path under params/ -> (Hugging Face source tensors, GGUF source tensors, transform(list of arrays, cfg)).
# "{i}" marks a per-layer tensor; the transform turns torch-layout [out, in] tensors into our layout.
PARAM_TABLE: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...], Callable]] = {
    ("embed",): (("model.embed_tokens.weight",), ("token_embd.weight",), _SAME),
    ("final_norm", "scale"): (("model.norm.weight",), ("output_norm.weight",), _SAME),
    ("lm_head",): (("lm_head.weight",), ("output.weight",), _T),
    ("layers", "attn_norm", "scale"): (
        ("model.layers.{i}.input_layernorm.weight",),
        ("blk.{i}.attn_norm.weight",),
        _SAME,
    ),
    ("layers", "attn", "qkv"): (
        tuple(f"{_ATTN}{p}_proj.weight" for p in "qkv"),
        tuple(f"blk.{{i}}.attn_{p}.weight" for p in "qkv"),
        _qkv,
    ),
    ("layers", "attn", "qkv_bias"): (
        tuple(f"{_ATTN}{p}_proj.bias" for p in "qkv"),
        tuple(f"blk.{{i}}.attn_{p}.bias" for p in "qkv"),
        _qkv_bias,
    ),
    ("layers", "attn", "o"): ((f"{_ATTN}o_proj.weight",), ("blk.{i}.attn_output.weight",), _out_proj),
    ("layers", "attn", "q_norm", "scale"): ((f"{_ATTN}q_norm.weight",), ("blk.{i}.attn_q_norm.weight",), _SAME),
    ("layers", "attn", "k_norm", "scale"): ((f"{_ATTN}k_norm.weight",), ("blk.{i}.attn_k_norm.weight",), _SAME),
    ("layers", "mlp_norm", "scale"): (
        ("model.layers.{i}.post_attention_layernorm.weight",),
        ("blk.{i}.ffn_norm.weight",),
        _SAME,
    ),
    ("layers", "mlp", "gate_up"): (
        (f"{_MLP}gate_proj.weight", f"{_MLP}up_proj.weight"),
        ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
        _gate_up,
    ),
    ("layers", "mlp", "down"): ((f"{_MLP}down_proj.weight",), ("blk.{i}.ffn_down.weight",), _T),
}

GGUF_TO_HF = {g: h for hf, gg, _ in PARAM_TABLE.values() for h, g in zip(hf, gg, strict=True)}


def _flat_shapes(boxed) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    out = {}
    for path, leaf in flat:
        key = tuple(p.key for p in path)
        out[key] = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    return out


def assemble_params(
    cfg: ModelConfig,
    boxed_shapes,
    read: Callable[[str], np.ndarray],
    dtype,
    progress: bool = True,
    desc: str = "loading weights",
):
    """Build {'params': ...} with every array checked against the model's own shape description.

    boxed_shapes: `jax.eval_shape(model.init)` output; read(hf_name) -> array in Hugging Face layout.
    """
    shapes = _flat_shapes(boxed_shapes)
    tree: dict = {}
    np_dtype = jnp.dtype(dtype)
    for path in tqdm(shapes, desc=desc, disable=not progress, unit="tensor"):
        rule, layer = _rule_key(path)
        if rule not in PARAM_TABLE:
            raise ModelLoadError(f"no loading rule for parameter {'/'.join(path)}")
        names, _, fn = PARAM_TABLE[rule]
        want = shapes[path].shape
        if layer is not None:  # one layer of an unrolled model
            arr = _source_tensor(names, layer, fn, read, cfg, want).astype(np_dtype)
        elif "{i}" in names[0]:
            arr = np.empty(want, np_dtype)
            for i in range(cfg.num_layers):
                arr[i] = _source_tensor(names, i, fn, read, cfg, want[1:])
        else:
            arr = _source_tensor(names, None, fn, read, cfg, want).astype(np_dtype)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr)
    return {"params": tree}


def _source_tensor(names, layer: int | None, fn, read, cfg: ModelConfig, want) -> np.ndarray:
    """One param's array: its source tensors (of `layer`, for per-layer names) read, transformed, checked."""
    sources = [n.format(i=layer) for n in names]
    return _checked(fn([read(n) for n in sources], cfg), want, sources[0])


def _rule_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """The PARAM_TABLE key of a param path, and its layer for the unrolled layout (`layers_3/...`)."""
    head, _, index = path[0].rpartition("_")
    if head == "layers" and index.isdigit():
        return ("layers",) + path[1:], int(index)
    return path, None


def _checked(arr: np.ndarray, want: tuple[int, ...], name: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(want):
        raise ModelLoadError(f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(want)} from the config")
    return arr
