"""Perplexity of a loaded model over a text, in fixed windows: what one runs to judge a quantization.

Each window is one cache-free forward of a fixed length, so a single compiled shape serves the whole
text; a short last window is padded and its padded positions are masked out of the sum. Compare
perplexities only between runs with the same text, tokenizer and window.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.kv_cache import KVCache
from jaxllm.errors import InvalidRequestError
from jaxllm.models.registry import forward
from jaxllm.sharding import placed

if TYPE_CHECKING:
    from jaxllm.loading.load import LoadedModel
    from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """perplexity: exp(mean_nll); mean_nll: mean negative log-likelihood per scored token (nats);
    tokens_scored: how many tokens were predicted; windows: how many forwards were run."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int


def read_text_ids(tokenizer: Tokenizer, path: str | Path) -> list[int]:
    """The token ids of a UTF-8 text file, with no special tokens: the windows cut the text anywhere, so a
    BOS at the start of the file would condition only the first window."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"text file {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"text file {str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise InvalidRequestError(f"text file {str(path)!r} is empty: give it some text to score")
    return tokenizer.encode(text, add_special_tokens=False)


def _window_nll(model, cfg, params, tokens, n_valid, first):
    """(NLL sum, count) of tokens[j] given tokens[:j] for first <= j < n_valid. tokens: [window] int32;
    n_valid, first: scalars. The [window, vocab] logits stay on the device."""
    window = tokens.shape[0]
    positions = jnp.arange(window, dtype=jnp.int32)
    cache = KVCache.zeros(cfg, 1, 1)  # never read or written: block_tables None and ctx_len 0
    logits, _ = forward(model, params, tokens[None], positions[None], cache, None, jnp.zeros((1,), jnp.int32), 0)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)  # predicts tokens[1:]
    target_logp = jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
    j = positions[1:]
    mask = (j >= first) & (j < n_valid)
    return -jnp.sum(jnp.where(mask, target_logp, 0.0)), jnp.sum(mask)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first local index to score) of every window that scores at least one token. With
    overlapping windows (stride < window) each one scores only what the previous ones did not."""
    out, start = [], 0
    while True:
        first = 1 if start == 0 else max(1, window - stride)
        if first < min(window, n - start):
            out.append((start, first))
        if start + window >= n:
            return out
        start += stride


def _validate(loaded: LoadedModel, token_ids: list[int], window: int, stride: int | None) -> None:
    cfg = loaded.config
    if len(token_ids) < 2:
        raise InvalidRequestError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    if window < 2:
        raise InvalidRequestError(f"window must be at least 2 tokens, got {window}")
    if window > cfg.max_position_embeddings:
        raise InvalidRequestError(
            f"window {window} exceeds the model's context of {cfg.max_position_embeddings} tokens"
        )
    if stride is not None and stride < 1:
        raise InvalidRequestError(f"stride must be at least 1, got {stride}")
    lo, hi = min(token_ids), max(token_ids)
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidRequestError(f"token id {bad} is outside the model's vocabulary of {cfg.vocab_size}")


def perplexity(
    loaded: LoadedModel, token_ids: list[int], window: int = 512, stride: int | None = None
) -> PerplexityResult:
    """Perplexity of `loaded` over `token_ids` in windows of `window` tokens, starting every `stride`
    tokens (default: `window`, i.e. non-overlapping). Each window's first token is context only; with
    stride < window each window scores only the tokens past the previous window, with more context."""
    _validate(loaded, token_ids, window, stride)
    stride = window if stride is None else stride
    ids = np.asarray(token_ids, np.int32)
    model, cfg = loaded.model, loaded.config
    score = jax.jit(lambda params, tokens, n_valid, first: _window_nll(model, cfg, params, tokens, n_valid, first))
    parts = []
    with placed(loaded.placement):  # sharded weights: the kernels run per shard
        for start, first in _windows(len(ids), window, stride):
            chunk = ids[start : start + window]
            padded = np.zeros(window, np.int32)
            padded[: len(chunk)] = chunk
            parts.append(score(loaded.params, padded, np.int32(len(chunk)), np.int32(first)))
    # every window is dispatched before any result is read back
    nll = sum(float(s) for s, _ in parts)
    count = sum(int(c) for _, c in parts)
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, tokens_scored=count, windows=len(parts))
