"""One forward over a flat, ragged run of tokens (decodes beside prefill chunks) equals separate forwards."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine.kv_cache import KVCache
from jaxllm.kernels import Ragged
from jaxllm.loading.load import load_model
from jaxllm.models.registry import forward

PAGE = 4


def _pages(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_a_ragged_step_equals_separate_prefill_and_decode(tiny_models, monkeypatch, scan_layers, impl):
    monkeypatch.setenv("JAXLLM_ATTENTION", impl)
    loaded = load_model(str(tiny_models["llama"][0]), progress=False, scan_layers=scan_layers)
    model, params, cfg = loaded.model, loaded.params, loaded.config
    rng = np.random.default_rng(0)
    toks = lambda n: rng.integers(3, cfg.vocab_size, n).astype(np.int32)
    # a: 10 tokens cached, decodes its 11th; b: a fresh 7-token prompt; c: 5 cached, a 6-token chunk that
    # crosses a page boundary. Each sequence owns 4 pages of 4 tokens.
    a_ctx, b_new, c_ctx, c_new = toks(10), toks(7), toks(5), toks(6)
    a_tok = toks(1)
    tables = np.array([_pages(0, 4), _pages(4, 4), _pages(8, 4)], np.int32)
    cache = KVCache.zeros(cfg, 16, PAGE, per_layer=not scan_layers)

    def run(cache, tokens, start, table, ctx_len, **kw):
        positions = jnp.asarray((start + np.arange(len(tokens), dtype=np.int32))[None])
        ctx = jnp.asarray([start], jnp.int32)
        table = jnp.asarray(table[None])
        return forward(model, params, jnp.asarray(tokens[None]), positions, cache, table, ctx, ctx_len, **kw)

    _, cache = run(cache, a_ctx, 0, tables[0], 0)  # the cached contexts of a and c
    _, start = run(cache, c_ctx, 0, tables[2], 0)

    # separately: a decodes, b and c prefill (logits of each chunk's last token)
    want_a, cache_sep = run(start, a_tok, 10, tables[0], 16)
    want_b, cache_sep = run(cache_sep, b_new, 0, tables[1], 0, logits_index=jnp.asarray([6]))
    want_c, cache_sep = run(cache_sep, c_new, 5, tables[2], 8, logits_index=jnp.asarray([5]))
    want = np.concatenate([np.asarray(want_a)[:, 0], np.asarray(want_b), np.asarray(want_c)])

    # together: one flat run [a | b | c | 3 padding tokens], 2 padding sequences
    flat = np.concatenate([a_tok, b_new, c_new, np.zeros(3, np.int32)])
    positions = np.concatenate([[10], np.arange(7), 5 + np.arange(6), np.zeros(3)]).astype(np.int32)
    seq_ids = np.array([0] + [1] * 7 + [2] * 6 + [5] * 3, np.int32)
    ragged = Ragged(
        q_starts=jnp.asarray([0, 1, 8, 14, 14], jnp.int32),
        q_lens=jnp.asarray([1, 7, 6, 0, 0], jnp.int32),
        seq_ids=jnp.asarray(seq_ids),
        max_q_len=8,
    )
    all_tables = np.concatenate([tables, np.full((2, 4), 16, np.int32)])
    got, cache_mixed = forward(
        model,
        params,
        jnp.asarray(flat[None]),
        jnp.asarray(positions[None]),
        start,
        jnp.asarray(all_tables),
        jnp.asarray([10, 0, 5, 0, 0], jnp.int32),
        16,
        logits_index=jnp.asarray([0, 7, 13]),
        ragged=ragged,
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    for mixed, sep in zip(jnp.asarray(cache_mixed.k), jnp.asarray(cache_sep.k), strict=True):  # same keys written
        np.testing.assert_allclose(np.asarray(mixed), np.asarray(sep), atol=1e-5)
