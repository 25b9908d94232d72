"""Assemble the stacked Flax param tree from per-tensor reads, shared by every file format.

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


def _heads(n_attr: str, out: bool = False):
    """[n*hd, d] -> [d, n, hd] (projections in), or [d, n*hd] -> [n, hd, d] (the output projection)."""

    def f(w, c: ModelConfig):
        n = getattr(c, n_attr)
        if out:
            return w.T.reshape(n, c.head_dim, w.shape[0])
        return w.T.reshape(w.shape[1], n, c.head_dim)

    return f


def _bias(n_attr: str):
    return lambda w, c: w.reshape(getattr(c, n_attr), c.head_dim)


_T = lambda w, c: w.T
_SAME = lambda w, c: w

# (flax path under params/, Hugging Face name, GGUF name, transform). "{i}" marks a per-layer tensor.
PARAM_TABLE: list[tuple[tuple[str, ...], str, str, Callable]] = [
    (("embed",), "model.embed_tokens.weight", "token_embd.weight", _SAME),
    (("final_norm", "scale"), "model.norm.weight", "output_norm.weight", _SAME),
    (("lm_head",), "lm_head.weight", "output.weight", _T),
    (("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", _SAME),
    (("layers", "attn", "q"), "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", _heads("num_heads")),
    (("layers", "attn", "k"), "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
     _heads("num_kv_heads")),
    (("layers", "attn", "v"), "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
     _heads("num_kv_heads")),
    (("layers", "attn", "o"), "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
     _heads("num_heads", out=True)),
    (("layers", "attn", "q_bias"), "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", _bias("num_heads")),
    (("layers", "attn", "k_bias"), "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias",
     _bias("num_kv_heads")),
    (("layers", "attn", "v_bias"), "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias",
     _bias("num_kv_heads")),
    (("layers", "attn", "q_norm", "scale"), "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight",
     _SAME),
    (("layers", "attn", "k_norm", "scale"), "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight",
     _SAME),
    (("layers", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
     _SAME),
    (("layers", "mlp", "gate"), "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", _T),
    (("layers", "mlp", "up"), "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", _T),
    (("layers", "mlp", "down"), "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", _T),
]

GGUF_TO_HF = {gguf: hf for _, hf, gguf, _ in PARAM_TABLE}


def _flat_shapes(boxed) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    out = {}
    for path, leaf in flat:
        key = tuple(p.key for p in path)
        out[key] = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    return out


def assemble_params(cfg: ModelConfig, boxed_shapes, read: Callable[[str], np.ndarray], dtype,
                    progress: bool = True, desc: str = "loading weights"):
    """Build {'params': ...} with every array checked against the model's own shape description.

    boxed_shapes: `jax.eval_shape(model.init)` output; read(hf_name) -> array in Hugging Face layout.
    """
    shapes = _flat_shapes(boxed_shapes)
    table = {path: (hf, fn) for path, hf, _, fn in PARAM_TABLE}
    tree: dict = {}
    np_dtype = jnp.dtype(dtype)
    for path in tqdm(shapes, desc=desc, disable=not progress, unit="tensor"):
        if path not in table:
            raise ModelLoadError(f"no loading rule for parameter {'/'.join(path)}")
        hf, fn = table[path]
        want = shapes[path].shape
        if "{i}" in hf:
            arr = np.empty(want, np_dtype)
            for i in range(cfg.num_layers):
                arr[i] = _checked(fn(read(hf.format(i=i)), cfg), want[1:], hf.format(i=i))
        else:
            arr = _checked(fn(read(hf), cfg), want, hf).astype(np_dtype)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr)
    return {"params": tree}


def _checked(arr: np.ndarray, want: tuple[int, ...], name: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(want):
        raise ModelLoadError(f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(want)} from the config")
    return arr
