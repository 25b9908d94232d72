"""Maps model types to their implementation, and the model-agnostic forward over a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.errors import UnsupportedModelError
from jaxllm.models import llama, llama_weights
from jaxllm.models.describe import Param

# model type -> (Flax module, the family's parameter description)
FAMILIES = {
    "llama": (llama.Transformer, llama_weights.W),
    "mistral": (llama.Transformer, llama_weights.W),
    "qwen2": (llama.Transformer, llama_weights.W),
    "qwen3": (llama.Transformer, llama_weights.W),
}


def _family(cfg: ModelConfig):
    try:
        return FAMILIES[cfg.model_type]
    except KeyError:
        raise UnsupportedModelError(f"model type {cfg.model_type!r} is not supported") from None


def describe_params(cfg: ModelConfig) -> dict[tuple[str, ...], Param]:
    """The family's parameter description, by path (see `jaxllm.models.describe`)."""
    return _family(cfg)[1]


def build_model(cfg: ModelConfig, dtype=jnp.float32, scan_layers: bool = True, quant=None):
    """The Flax module for this config (not initialised: params come from a loader).

    scan_layers: run the layers under `nn.scan` over stacked params (`layers/...`: one compiled layer
    body) or unrolled over per-layer params (`layers_0/...`). Unrolled, XLA:CPU reads each weight in
    place instead of copying the scan's slice (offline decode ~25% faster at batch 1 for SmolLM2), but
    every compiled step takes ~3x longer to compile, which a server meets on its hot path.
    quant: a `QuantPlan` naming the params stored quantized (None: all float).
    """
    return _family(cfg)[0](cfg, dtype, scan_layers, quant)


def param_shapes(model):
    """The boxed parameter description (shapes, dtypes, logical axes) without allocating weights."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, None, None, jnp.zeros((1,), jnp.int32))
    )


NO_PAGE = 2**30  # a page id past any pool: writes there are dropped


def forward(
    model,
    params,
    tokens,
    positions,
    cache,
    block_tables,
    ctx_lens,
    ctx_len: int,
    logits_index=None,
    ragged=None,
    lora_ids=None,
):
    """One model call over the paged KV cache: (logits, new cache). Pure; jitted by the runner.

    tokens, positions: [batch, seq]; cache: KVCache with k, v [layers, num_pages, page_size, kv_heads, head_dim]
    (per-layer tuples for an unrolled model); block_tables: [batch, n_pages] int32 pages of each row, covering
    both the context read and the positions written; ctx_lens: [batch] valid cached tokens per row; ctx_len:
    static number of cached positions to attend to; logits_index: [batch] or None (see Transformer). New
    keys/values land at `positions`; with block_tables None nothing is read or written (a cache-free forward).
    ragged (`kernels.Ragged`): tokens and positions [1, n] are one flat run of tokens from the sequences that
    block_tables [seqs, n_pages] and ctx_lens [seqs] describe (a mixed prefill and decode step); each token's
    keys/values land in its sequence's pages (padding tokens write nothing); logits_index [k] picks the tokens
    whose logits are computed. lora_ids: like tokens, each token's adapter slot in params' 'lora' collection
    (see `Transformer`).
    """
    k, v = (cache.k, cache.v) if ctx_len or ragged is not None else (None, None)
    logits, (k_new, v_new) = model.apply(
        params, tokens, positions, k, v, ctx_lens, block_tables, ctx_len, logits_index, ragged, lora_ids
    )
    if block_tables is None:
        return logits, cache
    if ragged is None:
        return logits, cache.write(block_tables, positions, k_new, v_new)
    # Each token is a row of one through its sequence's block table.
    n_seqs = block_tables.shape[0]
    ids = ragged.seq_ids
    real = (ids >= 0) & (ids < n_seqs)
    tables = jnp.where(real[:, None], block_tables[jnp.clip(ids, 0, n_seqs - 1)], NO_PAGE)
    per_token = lambda x: jnp.swapaxes(x, 1, 2)  # [layers, 1, n, ...] -> [layers, n, 1, ...]
    return logits, cache.write(tables, positions[0][:, None], per_token(k_new), per_token(v_new))
