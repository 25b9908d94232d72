"""Perplexity in fixed windows: exact against a NumPy re-computation from unpadded forwards, and on SmolLM2."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import InvalidRequestError
from jaxllm.eval.perplexity import perplexity, read_text_ids
from jaxllm.loading.load import LoadOptions, load_model
from jaxllm.models.registry import forward
from tests.conftest import TINY, make_tiny_model

TEXT = Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ppl")
    make_tiny_model(folder, "llama")
    return load_model(str(folder), progress=False)


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], n).tolist()


def _reference(loaded, ids, window, stride):
    """(NLL sum, count), every window its own unpadded forward, log-softmax in float64 on the host."""
    # jitted only for speed (eager dispatch of the layer scan is slow); each chunk length compiles once
    fwd = jax.jit(
        lambda params, t, pos: forward(loaded.model, params, t, pos, None, None, jnp.zeros((1,), jnp.int32), 0)
    )
    nll, count, start = 0.0, 0, 0
    while True:
        chunk = np.asarray(ids[start : start + window], np.int32)
        first = 1 if start == 0 else max(1, window - stride)
        if first < len(chunk):
            pos = np.arange(len(chunk), dtype=np.int32)
            logits, _ = fwd(loaded.params, chunk[None], pos[None])
            x = np.asarray(logits[0], np.float64)
            logp = x - x.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            j = np.arange(first, len(chunk))
            nll -= logp[j - 1, chunk[j]].sum()
            count += len(j)
        if start + window >= len(ids):
            return nll, count
        start += stride


@pytest.mark.parametrize("n, window, stride", [(53, 16, None), (53, 16, 10), (7, 16, None)])
def test_matches_unpadded_reference(tiny, n, window, stride):
    ids = _ids(n)
    got = perplexity(tiny, ids, window=window, stride=stride)
    nll, count = _reference(tiny, ids, window, stride or window)
    assert got.tokens_scored == count
    assert got.mean_nll == pytest.approx(nll / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_window_accounting(tiny):
    ids = _ids(49)  # 3 full windows of 16 and one of a single token, which scores nothing
    got = perplexity(tiny, ids, window=16)
    assert (got.windows, got.tokens_scored) == (3, 48 - 3)
    got = perplexity(tiny, ids, window=16, stride=8)  # overlapping: every token but the first, once
    assert got.tokens_scored == 48


@pytest.mark.parametrize(
    "ids, kw, match",
    [
        ([5], {}, "at least 2 tokens"),
        (list(range(10)), {"window": 1}, "window must be"),
        (list(range(10)), {"window": TINY["max_position_embeddings"] + 1}, "exceeds the model's context"),
        (list(range(10)), {"window": 8, "stride": 0}, "stride must be"),
        ([3, TINY["vocab_size"]], {"window": 8}, "outside the model's vocabulary"),
    ],
)
def test_bad_requests(tiny, ids, kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        perplexity(tiny, ids, **kw)


def test_read_text_ids(tiny, tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        read_text_ids(tiny.tokenizer, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(InvalidRequestError, match="empty"):
        read_text_ids(tiny.tokenizer, tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        read_text_ids(tiny.tokenizer, tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text("the cat")
    want = tiny.tokenizer.encode("the cat", add_special_tokens=False)
    assert read_text_ids(tiny.tokenizer, tmp_path / "ok.txt") == want


@pytest.mark.slow
def test_smollm2_perplexity_on_english():
    loaded = load_model("smollm2", progress=False, options=LoadOptions(dequantize=True))
    ids = read_text_ids(loaded.tokenizer, TEXT)
    assert 1900 <= len(ids) <= 2200
    t0 = time.perf_counter()
    got = perplexity(loaded, ids, window=512)
    print(
        f"SmolLM2 float perplexity {got.perplexity:.3f} over {got.tokens_scored} tokens in {got.windows} windows, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    assert got.windows == math.ceil(len(ids) / 512)
    assert math.isfinite(got.perplexity)
    assert 10 < got.perplexity < 40  # measured 19.90, as transformers gives on the same windows
