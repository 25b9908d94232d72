"""The BERT family of encoders (BERT, RoBERTa, XLM-RoBERTa, CamemBERT) as one Flax module, and its params.

Bidirectional post-norm layers over absolute position embeddings: tokens and a padding mask in, the last
hidden states out (no pooler, no heads: pooling is the embedding pipeline's, see `jaxllm.embeddings`). The
layers run under `nn.scan` over stacked params (`layers/...`): one compiled layer body per input shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.errors import ModelLoadError, UnsupportedModelError
from jaxllm.models.describe import Param, param_index
from jaxllm.models.layers import param, weight

# model_type -> whether position ids start after the padding id (RoBERTa's way) rather than at 0
MODEL_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
NEG_INF = -1e30  # added to the scores of padding keys: exp() underflows to 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """What the encoder needs from a Hugging Face `config.json`; hashable, so a static argument of jits.

    position_offset: the position id of the first token (0 for BERT, pad_token_id + 1 for RoBERTa)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_offset: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_len(self) -> int:
        """The longest input the position embeddings cover."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, raw: dict) -> BertConfig:
        """From a parsed `config.json`; `UnsupportedModelError` for what this module does not run."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"encoder model type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )
        act = raw.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"encoder activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        kind = raw.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise UnsupportedModelError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            if hidden % heads:
                raise ModelLoadError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                position_offset=int(raw.get("pad_token_id") or 0) + 1 if MODEL_TYPES[model_type] else 0,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the field {e.args[0]!r}: the model folder is incomplete") from e
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has a malformed value: {e}") from e


# ---- the params, each described once (see `describe.Param`); Hugging Face names without the model prefix ----
_L = "encoder.layer.{i}."
_hidden = lambda c: (c.hidden_size,)
_heads = lambda c: (c.num_heads, c.head_dim)


def _norm(path: tuple[str, ...], hf: str) -> tuple[Param, Param]:
    return Param((*path, "scale"), (f"{hf}.weight",), ()), Param((*path, "bias"), (f"{hf}.bias",), ())


def _table(path: str, hf: str, rows) -> Param:
    return Param((path,), (f"embeddings.{hf}.weight",), (), "embedding", _hidden, rows, ("embed",), ("vocab",))


PARAMS = (
    _table("embed", "word_embeddings", lambda c: (c.vocab_size,)),
    _table("position_embed", "position_embeddings", lambda c: (c.max_position_embeddings,)),
    _table("type_embed", "token_type_embeddings", lambda c: (c.type_vocab_size,)),
    *_norm(("embed_norm",), "embeddings.LayerNorm"),
    Param(
        ("layers", "attn", "qkv"),
        tuple(f"{_L}attention.self.{p}.weight" for p in ("query", "key", "value")),
        (),
        "matmul",
        _hidden,
        lambda c: (3, c.num_heads, c.head_dim),
        ("embed",),
        (None, "q_heads", "head_dim"),
    ),
    Param(("layers", "attn", "qkv_bias"), tuple(f"{_L}attention.self.{p}.bias" for p in ("query", "key", "value")), ()),
    Param(
        ("layers", "attn", "o"),
        (f"{_L}attention.output.dense.weight",),
        (),
        "matmul",
        _heads,
        _hidden,
        ("q_heads", "head_dim"),
        ("embed",),
    ),
    Param(("layers", "attn", "o_bias"), (f"{_L}attention.output.dense.bias",), ()),
    *_norm(("layers", "attn_norm"), f"{_L}attention.output.LayerNorm"),
    Param(
        ("layers", "mlp", "up"),
        (f"{_L}intermediate.dense.weight",),
        (),
        "matmul",
        _hidden,
        lambda c: (c.intermediate_size,),
        ("embed",),
        ("mlp",),
    ),
    Param(("layers", "mlp", "up_bias"), (f"{_L}intermediate.dense.bias",), ()),
    Param(
        ("layers", "mlp", "down"),
        (f"{_L}output.dense.weight",),
        (),
        "matmul",
        lambda c: (c.intermediate_size,),
        _hidden,
        ("mlp",),
        ("embed",),
    ),
    Param(("layers", "mlp", "down_bias"), (f"{_L}output.dense.bias",), ()),
    *_norm(("layers", "mlp_norm"), f"{_L}output.LayerNorm"),
)

W = param_index(PARAMS)


class LayerNorm(nn.Module):
    """Layer norm over the last axis with scale and bias, computed in float32: x [..., d] -> [..., d]."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("embed",), nn.initializers.ones, self.dtype)
        bias = param(self, "bias", (d,), ("embed",), nn.initializers.zeros, self.dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biases; padding keys are masked out."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_bias):
        """x [batch, seq, hidden]; key_bias [batch, 1, 1, seq] (0 for real keys, NEG_INF for padding)."""
        c, dt = self.cfg, self.dtype
        wqkv = weight(self, W[("layers", "attn", "qkv")], c, None, dt)
        bqkv = param(
            self, "qkv_bias", (3, c.num_heads, c.head_dim), (None, "q_heads", "head_dim"), nn.initializers.zeros, dt
        )
        wo = weight(self, W[("layers", "attn", "o")], c, None, dt)
        bo = param(self, "o_bias", (c.hidden_size,), ("embed",), nn.initializers.zeros, dt)
        qkv = jnp.einsum("btd,dphk->btphk", x, wqkv) + bqkv
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v, bias=key_bias.astype(dt), implementation="xla")
        return jnp.einsum("bqhk,hkd->bqd", out, wo) + bo


class MLP(nn.Module):
    """down(act(up(x))) with biases: x [batch, seq, hidden] -> [batch, seq, hidden]."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.dtype
        up = weight(self, W[("layers", "mlp", "up")], c, None, dt)
        down = weight(self, W[("layers", "mlp", "down")], c, None, dt)
        up_bias = param(self, "up_bias", (c.intermediate_size,), ("mlp",), nn.initializers.zeros, dt)
        down_bias = param(self, "down_bias", (c.hidden_size,), ("embed",), nn.initializers.zeros, dt)
        h = ACTIVATIONS[c.hidden_act](jnp.einsum("btd,df->btf", x, up) + up_bias)
        return jnp.einsum("btf,fd->btd", h, down) + down_bias


class EncoderLayer(nn.Module):
    """Post-norm block: x = norm(x + attention(x)); x = norm(x + mlp(x)). The body of the layer scan."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_bias):
        """x [batch, seq, hidden]; key_bias [batch, 1, 1, seq]. Returns (x, None) for `nn.scan`."""
        c, dt = self.cfg, self.dtype
        with jax.named_scope("attention"):
            a = SelfAttention(c, dt, name="attn")(x, key_bias)
            x = LayerNorm(c.layer_norm_eps, dt, name="attn_norm")(x + a)
        with jax.named_scope("mlp"):
            x = LayerNorm(c.layer_norm_eps, dt, name="mlp_norm")(x + MLP(c, dt, name="mlp")(x))
        return x, None


class Encoder(nn.Module):
    """tokens [batch, seq] int32, mask [batch, seq] (1: a real token, 0: padding) -> hidden [batch, seq, hidden].

    Every token has token type 0 (one segment); position ids count the real tokens from `position_offset`,
    so rows may be padded on either side."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask):
        c, dt = self.cfg, self.dtype
        mask = jnp.asarray(mask, jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + c.position_offset
        words = weight(self, W[("embed",)], c, None, dt)
        places = weight(self, W[("position_embed",)], c, None, dt)
        types = weight(self, W[("type_embed",)], c, None, dt)
        x = jnp.take(words, tokens, axis=0) + jnp.take(places, positions, axis=0) + types[0]
        x = LayerNorm(c.layer_norm_eps, dt, name="embed_norm")(x)
        key_bias = jnp.where(mask > 0, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]
        layers = nn.scan(
            EncoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, dt, name="layers")
        x, _ = layers(x, key_bias)
        return x


def param_shapes(model: Encoder):
    """The boxed parameter description (shapes, dtypes, logical axes) without allocating weights."""
    one = jnp.ones((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one, one))


def forward(model: Encoder, params, tokens, mask):
    """The last hidden states [batch, seq, hidden] of tokens [batch, seq] with mask [batch, seq]. Pure; jit it."""
    return model.apply(params, jnp.asarray(tokens, jnp.int32), mask)
