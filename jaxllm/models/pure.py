"""The model as a pure function of its params, for notebooks: `jax.jit`, `jax.grad`, `jax.vmap` and shard it.

No KV cache and no engine: tokens in, logits (and, when asked, the hidden states of chosen layers) out.
Attention runs the `jax.numpy` reference by default, which every JAX transformation goes through on every
backend (the Pallas kernels have no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxllm.errors import InvalidRequestError


def differentiable(model, attention: str = "reference"):
    """The same Flax module (same params) with its attention implementation set to `attention`."""
    return model if model.attention == attention else model.clone(attention=attention)


def forward(model, params, tokens, positions=None, hidden_layers: Sequence[int] = (), adapter=None):
    """Logits of every position: tokens [batch, seq] int32 -> logits [batch, seq, vocab] float32.

    positions: [batch, seq] int32 (default 0..seq-1 in every row); each row attends causally to its own
    earlier positions only, so right padding never changes the positions before it. hidden_layers (static):
    indices of layers (0-based; negative counts from the end) whose outputs to return as well, the
    residual stream after that layer: then (logits, hidden [len(hidden_layers), batch, seq, embed]).
    params: the loaded params pytree (`LoadedModel.params`), edited or not. adapter: a LoRA adapter
    (`jaxllm.lora.Adapter`) added to every token's projections; differentiable in its weights.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise InvalidRequestError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    batch, seq = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    ctx_lens = jnp.zeros((batch,), jnp.int32)
    layers = _layer_indices(hidden_layers, model.cfg.num_layers)
    ids = None
    if adapter is not None:
        from jaxllm.lora.slots import single

        params = {**params, "lora": single(adapter, model.cfg, model.scan_layers)}
        ids = jnp.zeros((batch, seq), jnp.int32)
    args = (tokens, positions, None, None, ctx_lens)
    if not layers:
        logits, _ = model.apply(params, *args, lora_ids=ids)
        return logits
    (logits, _), state = model.apply(params, *args, lora_ids=ids, mutable=["intermediates"])
    return logits, _hidden(state["intermediates"], layers, model.scan_layers)


def _layer_indices(hidden_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    out = []
    for i in hidden_layers:
        if not -num_layers <= int(i) < num_layers:
            raise InvalidRequestError(f"hidden layer {i} is out of range: the model has {num_layers} layers")
        out.append(int(i) % num_layers)
    return tuple(out)


def _hidden(sown: dict, layers: tuple[int, ...], scanned: bool) -> jax.Array:
    """The sown layer outputs picked at `layers`: [len(layers), batch, seq, embed]."""
    if scanned:
        return sown["layers"]["hidden"][0][jnp.asarray(layers)]
    return jnp.stack([sown[f"layers_{i}"]["hidden"][0] for i in layers])
