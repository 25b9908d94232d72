"""Token sampling on device, per row of a batch: penalties, temperature, top-k/p, min-p, seeds, logprobs.

All functions are pure and jittable; per-row settings are arrays, and the few static flags let the
common cases (all greedy, no penalties, no filters) compile to less work.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.sampling_params import MAX_TOP_LOGPROBS

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowParams:
    """Per-row sampling settings, each [batch]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    min_tokens: jax.Array
    seed: jax.Array
    logprobs: jax.Array  # bool: the row asked for logprobs
    lora: jax.Array  # int32: the row's LoRA adapter slot (`jaxllm.lora.NO_ADAPTER`: none)
    # int32 [batch, ceil(vocab / 32)]: the tokens each row may take (see `apply_token_bitmask`; a free row's
    # words are all ones), under `SamplerFlags.grammar`; [batch, 0] otherwise.
    bitmask: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static choices that select a compiled variant: skip work no row in the batch needs."""

    sample: bool = False  # some row has temperature > 0
    filters: bool = False  # some row uses top-k, top-p or min-p
    penalties: bool = False  # some row has repetition/presence/frequency penalties or a logit bias
    min_tokens: bool = False  # some row suppresses stop tokens for its first tokens
    logprobs: bool = False  # some row asked for logprobs
    grammar: bool = False  # some row's output is constrained: `RowParams.bitmask` applies (one step per dispatch)

    @classmethod
    def every(cls) -> SamplerFlags:
        """The one variant that serves any batch: each part runs only when some row of the batch needs it,
        decided on device (`lax.cond`), so the choice costs no compile."""
        return cls(True, True, True, True, True)


def apply_penalties(logits, params: RowParams, prompt_mask, counts, bias):
    """logits [batch, vocab] -> penalised logits.

    repetition_penalty divides positive and multiplies negative logits of every token seen in the
    prompt or output (Hugging Face / CTRL); presence and frequency penalties subtract
    `presence * (count > 0) + frequency * count` over output tokens (OpenAI); bias is added.
    """
    seen = prompt_mask | (counts > 0)
    rep = params.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - params.frequency_penalty[:, None] * counts
    logits = logits - params.presence_penalty[:, None] * (counts > 0)
    return logits + bias


def apply_token_bitmask(logits, bitmask, constrained):
    """Disallowed tokens to -inf on constrained rows: logits [rows, V]; bitmask [rows, ceil(V / 32)] int32 (bit
    t % 32 of word t // 32 set: token t allowed, llguidance's layout); constrained [rows] bool (the others
    keep every token)."""
    rows, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [rows, words, 32]
    allowed = bits.reshape(rows, -1)[:, :vocab].astype(bool)
    return jnp.where(constrained[:, None] & ~allowed, -jnp.inf, logits)


def filter_logits(logits, top_k, top_p, min_p):
    """Mask logits [batch, vocab] to -inf outside each row's top-k, top-p nucleus and min-p floor.

    top_k [batch] (0: off), top_p [batch] (1: off), min_p [batch] (0: off). The highest-ranked token
    always survives.
    """
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    sorted_logits = jnp.where(keep, sorted_logits, NEG_INF)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep |= rank == 0
    mask = jnp.zeros_like(keep).at[jnp.arange(logits.shape[0])[:, None], order].set(keep)
    return jnp.where(mask, logits, NEG_INF)


def first_argmax(x):
    """Index [batch] int32 of the first maximum of x [batch, vocab], like `jnp.argmax` for finite values.

    Two vectorised reductions (max, then the smallest index holding it) instead of one reduction over
    (value, index) pairs, which XLA:CPU runs element by element: at [32, 49152] ~0.8 ms instead of
    ~3.5 ms, every decode step. A row with NaN picks the last token (argmax would pick the first NaN).
    """
    v = x.shape[-1]
    hit = x == x.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)


def gumbel_sample(key, logits):
    """One token id from logits [vocab] with PRNG key: the Gumbel-max draw of `jax.random.categorical`
    (the same noise, hence the same token), with the faster `first_argmax`."""
    noise = jax.random.gumbel(key, logits.shape, logits.dtype)
    return first_argmax((logits + noise)[None])[0]


def row_keys(seeds, steps):
    """One PRNG key per row from its seed and its token index: the same seed gives the same draws in any batch."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, steps)


def sample(
    logits, params: RowParams, steps, flags: SamplerFlags, *, prompt_mask=None, counts=None, bias=None, stop_mask=None
):
    """Pick one token per row. logits [batch, vocab] float32; steps [batch] tokens generated so far.

    stop_mask [vocab] bool marks the stop tokens suppressed while steps < min_tokens.
    Returns (tokens [batch] int32, logprob info or None): the info is (chosen logprob [batch],
    top ids [batch, MAX_TOP_LOGPROBS], top logprobs [batch, MAX_TOP_LOGPROBS]) of the raw model logits.
    """
    raw = logits
    if flags.penalties:
        seen = (params.repetition_penalty != 1) | (params.presence_penalty != 0) | (params.frequency_penalty != 0)
        needed = jnp.any(seen) | jnp.any(bias != 0)
        penalise = lambda x: apply_penalties(x, params, prompt_mask, counts, bias)
        logits = jax.lax.cond(needed, penalise, lambda x: x, logits)
    if flags.min_tokens:
        early = (steps < params.min_tokens)[:, None]
        logits = jnp.where(early & stop_mask[None, :], NEG_INF, logits)
    if flags.grammar:
        logits = apply_token_bitmask(logits, params.bitmask, jnp.ones(logits.shape[:1], bool))
    greedy = first_argmax(logits)
    tokens = greedy
    if flags.sample:
        hot = params.temperature > 0

        def draw(logits):
            scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
            if flags.filters:
                filtered = hot & ((params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0))
                limit = lambda x: filter_logits(x, params.top_k, params.top_p, params.min_p)
                scaled = jax.lax.cond(jnp.any(filtered), limit, lambda x: x, scaled)
            drawn = jax.vmap(gumbel_sample)(row_keys(params.seed, steps), scaled)
            return jnp.where(hot, drawn, greedy)

        tokens = jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, logits)
    info = None
    if flags.logprobs:
        rows = raw.shape[0]
        nothing = lambda _: (
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.int32),
            jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.float32),
        )
        info = jax.lax.cond(jnp.any(params.logprobs), lambda raw: token_logprobs(raw, tokens), nothing, raw)
    return tokens, info


def token_logprobs(logits, tokens):
    """Log-softmax of logits [rows, vocab] float32 at tokens [rows] int32 (clipped into the vocabulary), and
    the most likely tokens: (logprob [rows], top ids [rows, MAX_TOP_LOGPROBS], top logprobs [rows,
    MAX_TOP_LOGPROBS]). One pass for the log-normaliser, and the picks taken from the raw logits: on the CPU
    this is ~1.8x faster than materialising the log-softmax (74 vs 133 ms for [272, 49152])."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.clip(tokens, 0, logits.shape[-1] - 1)[:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logits, MAX_TOP_LOGPROBS)
    return picked - lse, top_ids.astype(jnp.int32), top - lse[:, None]
