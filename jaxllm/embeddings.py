"""Embeddings: sentence vectors from an encoder (`Embedder`) or a decoder (`LLM.embed`), and OpenAI's body.

Inputs are batched by length: sorted, cut into batches of at most `MAX_ROWS` rows (fewer for long inputs,
within `TOKEN_BUDGET` padded tokens), each padded on the right to a power-of-two length bucket and a
power-of-two row count, so that any set of inputs compiles few shapes. The model's states at the real
tokens are pooled (`pool`) and, when the model asks, normalised; `dimensions` then truncates the vectors
and normalises them again, as OpenAI does.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import ContextLengthError, InvalidRequestError
from jaxllm.loading import sentence_transformers as st
from jaxllm.loading.sentence_transformers import POOLING_MODES, pooling_mode
from jaxllm.models import bert
from jaxllm.models.layers import RMSNorm

MAX_ROWS = 32
TOKEN_BUDGET = 8192  # padded tokens per batch: bounds the [rows, heads, seq, seq] attention scores
MIN_BUCKET = 16
FINE_FROM = 64  # past this length, buckets grow by half of it instead of doubling

__all__ = ["EmbeddingResult", "Embedder", "POOLING_MODES", "embeddings_body", "is_encoder_model", "normalize", "pool"]


@dataclasses.dataclass
class EmbeddingResult:
    """vectors: [n, dim] float32, one per input in order; prompt_tokens: the tokens of all inputs."""

    vectors: np.ndarray
    prompt_tokens: int


def pool(hidden, mask, mode: str):
    """Sentence vectors [batch, dim] float32 from token states hidden [batch, seq, dim] and mask [batch, seq]
    (1: a real token, 0: padding, on either side). mode: 'cls' (the first real token), 'lasttoken' (the last),
    'mean', 'mean_sqrt_len' (the sum over the square root of the count), 'max', 'weightedmean' (token i of n
    weighted i)."""
    h = jnp.asarray(hidden, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    if mode in ("cls", "lasttoken"):
        seq = m.shape[1]
        index = jnp.argmax(m, axis=1) if mode == "cls" else seq - 1 - jnp.argmax(m[:, ::-1], axis=1)
        return jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]
    if mode == "max":
        return jnp.where(m[..., None] > 0, h, -jnp.inf).max(axis=1)
    weights = m * jnp.cumsum(m, axis=1) if mode == "weightedmean" else m
    total = jnp.einsum("bs,bsd->bd", weights, h)
    count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
    if mode == "mean_sqrt_len":
        return total / jnp.sqrt(count)
    if mode in ("mean", "weightedmean"):
        return total / count
    raise InvalidRequestError(f"pooling {mode!r} is not one of {', '.join(POOLING_MODES)}", "pooling")


def normalize(x):
    """x [..., dim] scaled to unit L2 norm along the last axis (a zero vector stays zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_dimensions(dimensions: int | None, dim: int) -> None:
    """InvalidRequestError naming `dimensions` unless it is None or an integer from 1 to dim."""
    if dimensions is None:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= dim:
        raise InvalidRequestError(f"dimensions must be an integer from 1 to {dim}, got {dimensions!r}", "dimensions")


def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """vectors [n, dim] cut to their first `dimensions` and normalised again (None: as they are)."""
    check_dimensions(dimensions, vectors.shape[1])
    if dimensions is None:
        return vectors
    cut = vectors[:, :dimensions]
    return (cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def input_list(inputs) -> list:
    """The inputs as a list of strings or of token-id lists; a lone string or token list is a list of one."""
    if isinstance(inputs, str) or (isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not isinstance(inputs, list | tuple) or not inputs:
        raise InvalidRequestError("input must be a non-empty list of strings or of token-id lists", "input")
    for i, x in enumerate(inputs):
        text = isinstance(x, str)
        ids = isinstance(x, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if not (text or ids) or len(x) == 0:
            raise InvalidRequestError(f"input {i} must be a non-empty string or list of token ids", "input")
    return list(inputs)


def check_tokens(token_lists: list[list[int]], max_len: int, vocab_size: int) -> None:
    """ContextLengthError for an input longer than max_len, InvalidRequestError for an id outside the vocabulary."""
    for i, ids in enumerate(token_lists):
        if len(ids) > max_len:
            raise ContextLengthError(
                f"input {i} is {len(ids)} tokens long; this model takes at most {max_len} tokens per input", "input"
            )
        if not ids:
            raise InvalidRequestError(f"input {i} has no tokens", "input")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InvalidRequestError(f"input {i} has a token id outside the vocabulary [0, {vocab_size})", "input")


def length_bucket(n: int, max_len: int) -> int:
    """The padded length of an n-token input: the next power of two from MIN_BUCKET up to FINE_FROM, then the
    next multiple of FINE_FROM // 2 (long inputs waste at most that much padding), at most max_len."""
    if n <= FINE_FROM:
        return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)
    step = FINE_FROM // 2
    return min(-(-n // step) * step, max_len)


def plan_batches(lengths: list[int], max_len: int) -> list[tuple[list[int], int]]:
    """(input indices, padded length) of each batch: longest first, at most MAX_ROWS rows and TOKEN_BUDGET
    padded tokens each (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
        bucket = length_bucket(lengths[order[start]], max_len)
        rows = min(MAX_ROWS, max(1, TOKEN_BUDGET // bucket))
        batches.append((order[start : start + rows], bucket))
        start += rows
    return batches


def run_batched(token_lists: list[list[int]], max_len: int, step: Callable) -> np.ndarray:
    """Sentence vectors [n, dim] float32 of the inputs through step(tokens [rows, seq] int32, mask [rows, seq]
    int32) -> [rows, dim], called on padded batches (`plan_batches`; rows padded to a power of two)."""
    out = None
    for indices, bucket in plan_batches([len(t) for t in token_lists], max_len):
        rows = 1 << (len(indices) - 1).bit_length()
        tokens = np.zeros((rows, bucket), np.int32)
        mask = np.zeros((rows, bucket), np.int32)
        for r, i in enumerate(indices):
            tokens[r, : len(token_lists[i])] = token_lists[i]
            mask[r, : len(token_lists[i])] = 1
        vectors = np.asarray(step(tokens, mask), np.float32)
        if out is None:
            out = np.zeros((len(token_lists), vectors.shape[1]), np.float32)
        out[indices] = vectors[: len(indices)]
    return out


class Embedder:
    """An encoder (BERT family) served for embeddings, with the pooling and normalisation of its folder.

    `Embedder.load(ref)`: a sentence-transformers folder (its `modules.json`, pooling config and
    `sentence_bert_config.json` are followed), a plain Hugging Face encoder folder (then mean pooling and
    normalisation, sentence-transformers' defaults) or a hub id in the local cache. Attributes: `name`,
    `tokenizer` (`jaxllm.tokenizer.Tokenizer`), `dim` (the vector size), `max_model_len` (tokens per input).
    Float32; one compiled forward per padded batch shape.
    """

    def __init__(self, loaded: st.LoadedEncoder):
        self.loaded = loaded
        self.name, self.tokenizer, self.config = loaded.name, loaded.tokenizer, loaded.config
        self.dim, self.max_model_len = loaded.config.hidden_size, loaded.max_len
        mode, normalized = loaded.sentence.pooling, loaded.sentence.normalize
        self.pooling, self.normalized = mode, normalized

        def step(params, tokens, mask):
            vectors = pool(bert.forward(loaded.model, params, tokens, mask), mask, mode)
            return normalize(vectors) if normalized else vectors

        self._step = jax.jit(step)

    @classmethod
    def load(cls, ref: str | os.PathLike, progress: bool = False) -> Embedder:
        """Load the encoder of a folder or hub id (see the class); progress: show a bar while reading weights."""
        return cls(st.load_encoder(ref, progress))

    def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None = None) -> EmbeddingResult:
        """One vector per input (texts are tokenized with the model's special tokens; token ids are used as
        given). Too long an input raises `ContextLengthError`. dimensions: keep the first `dimensions`
        components and normalise again (1..dim; meaningful for Matryoshka-trained models)."""
        inputs = input_list(inputs)
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        check_tokens(ids, self.max_model_len, self.loaded.config.vocab_size)
        check_dimensions(dimensions, self.dim)
        vectors = run_batched(ids, self.max_model_len, functools.partial(self._step, self.loaded.params))
        return EmbeddingResult(truncate(vectors, dimensions), sum(map(len, ids)))


class DecoderEmbedding:
    """Embeddings of a decoder (`LLM.embed`): its final hidden states (after the final norm: what the LM head
    reads), pooled and normalised as its folder's `modules.json` says (else the last token, normalised).

    loaded: the `LoadedModel`; sentence: the folder's `SentenceConfig`. The states come from the model's pure
    forward on right-padded rows at positions 0..n-1: attention is causal, so padding changes no real token."""

    def __init__(self, loaded, sentence: st.SentenceConfig):
        self.loaded, self.sentence = loaded, sentence
        norm = RMSNorm(loaded.config.rms_norm_eps, dtype=loaded.dtype)

        def step(mode, normalized, params, tokens, mask):
            _, hidden = loaded.forward(params, tokens, hidden_layers=(-1,))  # the unused logits are not computed
            states = norm.apply({"params": params["params"]["final_norm"]}, hidden[0])
            vectors = pool(states, mask, mode)
            return normalize(vectors) if normalized else vectors

        self._step = jax.jit(step, static_argnums=(0, 1))

    @classmethod
    def for_model(cls, loaded) -> DecoderEmbedding:
        """For `loaded`, with the pooling of the folder it was read from (a GGUF file: the defaults)."""
        if loaded.folder is None:
            return cls(loaded, st.defaults(None, encoder=False))
        return cls(loaded, st.read_sentence_config(loaded.folder, encoder=False))

    def embed(self, params, token_lists, max_len: int, dimensions=None, pooling: str | None = None) -> EmbeddingResult:
        """Vectors of token_lists through `params` (the LLM's current ones); pooling overrides the folder's mode
        (then normalised)."""
        check_tokens(token_lists, max_len, self.loaded.config.vocab_size)
        mode = pooling_mode(pooling) if pooling is not None else self.sentence.pooling
        normalized = True if pooling is not None else self.sentence.normalize
        check_dimensions(dimensions, self.loaded.config.hidden_size)
        step = functools.partial(self._step, mode, normalized, params)
        vectors = run_batched(token_lists, max_len, step)
        return EmbeddingResult(truncate(vectors, dimensions), sum(map(len, token_lists)))


def is_encoder_model(path: str | os.PathLike) -> bool:
    """Whether the local folder `path` holds a BERT-family encoder (its `config.json` model_type or
    architecture), to be served with `Embedder` rather than `LLM`. False for anything else (GGUF, hub ids)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and st.is_encoder_folder(folder)


def embeddings_body(result: EmbeddingResult, model: str, encoding_format: str = "float") -> dict:
    """OpenAI's embeddings response body; encoding_format 'base64' gives each vector as the base64 of its
    little-endian float32 bytes, 'float' as a list of floats."""
    if encoding_format not in ("float", "base64"):
        raise InvalidRequestError(
            f"encoding_format must be 'float' or 'base64', got {encoding_format!r}", "encoding_format"
        )
    data = []
    for i, v in enumerate(np.asarray(result.vectors, np.float32)):
        if encoding_format == "base64":
            value = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}
