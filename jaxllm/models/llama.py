"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as one Flax module.

The layers run either stacked under `nn.scan` (params `layers/...` with a leading layer axis: one
compiled body, fast to compile) or unrolled over per-layer params (`layers_0/...`, `layers_1/...`).
On XLA:CPU the scan's per-layer dynamic slice copies every weight matrix before its matmul (about a
third of a batch-1 decode step for SmolLM2); unrolled, the matmuls read the weights in place, but
each compiled step takes ~3x longer to compile. The paged KV cache is read-only inside the layers:
each layer reads its context through the block tables and returns its new keys and values, which the
caller writes into the (donated) cache with one scatter after the last layer, so XLA never copies
the cache per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm import kernels, quant
from jaxllm.config import ModelConfig
from jaxllm.models.layers import (
    GatedMLP,
    RMSNorm,
    adapter,
    apply_rope,
    param,
    rope_cos_sin,
    rope_inv_freq,
    weight,
)
from jaxllm.models.llama_weights import W
from jaxllm.quant.plan import QuantPlan


class Attention(nn.Module):
    """Grouped-query self-attention with optional qkv bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    quant: QuantPlan | None = None
    stack: int = 0
    attention: str | None = None

    @nn.compact
    def __call__(
        self,
        x,
        cos,
        sin,
        k_pages,
        v_pages,
        block_tables,
        ctx_lens,
        cache_layer=None,
        layer=None,
        ragged=None,
        lora_ids=None,
    ):
        """x [batch, seq, embed] -> (out [batch, seq, embed], k_new, v_new [batch, seq, kv_heads, head_dim]).

        k_pages, v_pages: this layer's pool, or the stacked cache read at `cache_layer` (see
        `kernels.paged_attention`); layer: the index into the stacked weights when `stack` (see `layers.param`);
        ragged: x is one flat run of tokens from several sequences (`kernels.Ragged`); lora_ids [batch, seq]:
        each token's adapter slot (`layers.adapter`).
        """
        c, dt, n = self.cfg, self.dtype, self.stack
        h, kvh, hd, g = c.num_heads, c.num_kv_heads, c.head_dim, c.num_groups
        # q, k and v in one matmul, grouped by kv head ([g query heads, k, v] per kv head) so that
        # sharding over kv heads keeps each group whole.
        wqkv = weight(self, W[("layers", "attn", "qkv")], c, self.quant, dt, n)
        wo = weight(self, W[("layers", "attn", "o")], c, self.quant, dt, n)
        qkv = quant.einsum("btd,dkgh->btkgh", x, wqkv, layer=layer, lora=adapter(self, "qkv", lora_ids)).astype(dt)
        if c.attention_bias:
            axes = ("kv_heads", None, "head_dim")
            bias = param(self, "qkv_bias", (kvh, g + 2, hd), axes, nn.initializers.zeros, dt, n)
            qkv = qkv + (bias[layer] if n else bias)
        b, t = x.shape[:2]
        q = qkv[:, :, :, :g].reshape(b, t, h, hd)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, "head_dim", dt, n, name="q_norm")(q, layer)
            k = RMSNorm(c.rms_norm_eps, "head_dim", dt, n, name="k_norm")(k, layer)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window = c.sliding_window
        out = kernels.paged_attention(
            q, k, v, k_pages, v_pages, block_tables, ctx_lens, window, self.attention, layer=cache_layer, ragged=ragged
        )
        o = quant.einsum("bthk,hkd->btd", out, wo, layer=layer, lora=adapter(self, "o", lora_ids))
        return o.astype(dt), k, v


class DecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP block; the body of the layer scan.

    Under the scan (`stack` = the number of layers) the layer gets every layer's weights and the whole
    stacked cache, with its own index: the weights and the cache are read at the index in place (the
    native kernels index them; XLA slices float weights for its dots), where a slice taken before a
    custom call would be a copy per layer. It attends to the first `ctx_len` positions of each row's
    pages (static).
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    ctx_len: int = 0
    quant: QuantPlan | None = None
    stack: int = 0
    attention: str | None = None

    @nn.compact
    def __call__(self, x, shared, cache, layer=None):
        """x [batch, seq, embed]; shared = (cos, sin, ctx_lens, block_tables [batch, n_pages], ragged or None,
        lora_ids [batch, seq] or None);
        cache = (k, v): the stacked [layers, num_pages, page_size, kv_heads, head_dim] read at `layer`
        ([] int32), or this layer's own [num_pages, page_size, kv_heads, head_dim] (layer None), or (None, None)."""
        cos, sin, ctx_lens, block_tables, ragged, lora_ids = shared
        k_pages, v_pages = cache
        cache_layer = layer
        if self.ctx_len:
            page_size = k_pages.shape[-3]
            if self.ctx_len < page_size:  # one page per row (contiguous layout): read only its head
                if layer is not None:
                    k_pages, v_pages, cache_layer = k_pages[layer], v_pages[layer], None
                k_pages, v_pages = k_pages[:, : self.ctx_len], v_pages[:, : self.ctx_len]
            block_tables = block_tables[:, : -(-self.ctx_len // page_size)]
        c, dt, n = self.cfg, self.dtype, self.stack
        with jax.named_scope("attention"):
            h = RMSNorm(c.rms_norm_eps, dtype=dt, stack=n, name="attn_norm")(x, layer)
            attn = Attention(c, dt, self.quant, n, self.attention, name="attn")
            a, k, v = attn(h, cos, sin, k_pages, v_pages, block_tables, ctx_lens, cache_layer, layer, ragged, lora_ids)
            x = x + a
        with jax.named_scope("mlp"):
            h = RMSNorm(c.rms_norm_eps, dtype=dt, stack=n, name="mlp_norm")(x, layer)
            mlp_params = (W[("layers", "mlp", "gate_up")], W[("layers", "mlp", "down")])
            x = x + GatedMLP(c, dt, self.quant, mlp_params, n, name="mlp")(h, layer, lora_ids)
        self.sow("intermediates", "hidden", x)  # the layer's output, kept only when asked for (a no-op otherwise)
        return x, (k, v)


class Transformer(nn.Module):
    """tokens [batch, seq] -> logits and the new keys/values of every layer.

    attention: the attention implementation (one of `kernels.attention.IMPLS`; None: the backend's default);
    'reference' is plain `jax.numpy`, which `jax.grad` and `jax.vmap` go through on every backend. Each
    layer sows its output [batch, seq, embed] as 'intermediates'/'hidden' (stacked over layers under the
    scan), kept when `apply` is called with `mutable=["intermediates"]`.
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True
    quant: QuantPlan | None = None
    attention: str | None = None

    @nn.compact
    def __call__(
        self,
        tokens,
        positions,
        k_cache,
        v_cache,
        ctx_lens,
        block_tables=None,
        ctx_len: int = 0,
        logits_index=None,
        ragged=None,
        lora_ids=None,
    ):
        """Run the model.

        tokens, positions: [batch, seq] int32; k_cache, v_cache: [layers, num_pages, page_size, kv_heads,
        head_dim] (or, unrolled, a tuple of one [num_pages, page_size, kv_heads, head_dim] per layer) or None;
        ctx_lens: [batch] valid cached positions per row; block_tables: [batch, n_pages] int32 pages of each row
        (see `jaxllm.engine.kv_cache`); ctx_len: static number of cached positions attended (0: none);
        logits_index: [batch] or None — when given, only the logits at that position of each row are computed
        ([batch, vocab] instead of [batch, seq, vocab]); ragged: tokens [1, n] are one flat run from the
        sequences that ctx_lens and block_tables [seqs, ...] describe (`kernels.Ragged`), and logits_index
        [k] picks k of the n tokens ([k, vocab]); lora_ids [batch, seq] int32: each token's adapter slot in the
        'lora' collection (see `layers.adapter`; None or no adapters: none).
        Returns (logits, (k_new, v_new)) with k_new, v_new [layers, batch, seq, kv_heads, head_dim].
        """
        c, dt = self.cfg, self.dtype
        embed = weight(self, W[("embed",)], c, self.quant, dt)
        x = quant.take(embed, tokens).astype(dt)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(c))
        shared = (cos, sin, ctx_lens, block_tables, ragged, lora_ids)
        layer_ctx = ctx_len if k_cache is not None else 0
        if self.scan_layers:
            if isinstance(k_cache, tuple):
                raise ValueError("scanned layers take the stacked KV cache: KVCache.zeros(per_layer=False)")
            # The params go in whole (broadcast) with a leading layer axis of their own, read at the index.
            layers = nn.scan(
                DecoderLayer,
                variable_broadcast=["params", "lora"],
                variable_axes={"intermediates": 0},
                split_rngs={"params": False},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=c.num_layers,
            )(c, dt, layer_ctx, self.quant, c.num_layers, self.attention, name="layers")
            x, (k_new, v_new) = layers(x, shared, (k_cache, v_cache), jnp.arange(c.num_layers, dtype=jnp.int32))
        else:
            ks, vs = [], []
            for i in range(c.num_layers):
                layer_cache = (k_cache[i], v_cache[i]) if k_cache is not None else (None, None)
                # Each layer's context gather waits for the layer's input: unordered, XLA would start all
                # the layers' gathers at once, contending with the matmuls for cores and cache.
                x, tables = jax.lax.optimization_barrier((x, block_tables))
                layer_shared = (cos, sin, ctx_lens, tables, ragged, lora_ids)
                layer = DecoderLayer(c, dt, layer_ctx, self.quant, attention=self.attention, name=f"layers_{i}")
                x, (k, v) = layer(x, layer_shared, layer_cache)
                ks.append(k)
                vs.append(v)
            # The cache write after the last layer must follow every layer's read of the cache: tie the
            # new keys/values to the final activations, or XLA copies the whole cache to write in place.
            x, k_new, v_new = jax.lax.optimization_barrier((x, jnp.stack(ks), jnp.stack(vs)))
        x = RMSNorm(c.rms_norm_eps, dtype=dt, name="final_norm")(x)
        if logits_index is not None and ragged is not None:
            x = x[0, logits_index]
        elif logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        if c.tie_word_embeddings:
            logits = quant.einsum("...d,vd->...v", x, embed, preferred_element_type=jnp.float32)
        else:
            head = weight(self, W[("lm_head",)], c, self.quant, dt)
            logits = quant.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32)
        return logits, (k_new, v_new)
