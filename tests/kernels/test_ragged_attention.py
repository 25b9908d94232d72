"""Ragged paged attention: a flat run of new tokens from sequences of any query length (decodes, prefill
chunks) against each sequence's paged context, equal to attending each sequence on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.attention import native_paged, reference
from jaxllm.kernels.attention.ragged_paged import pallas_ragged_paged_attention
from jaxllm.kernels.attention.tuning import PrefillBlockSizes

PAGE, PAGES, KVH, H, D = 4, 64, 2, 6, 16


def ragged_case(seqs, seed=0, pad_tokens=3, pad_seqs=2):
    """seqs: [(cached positions, new tokens)]. Returns the flat arguments and each sequence's own arguments."""
    rng = np.random.default_rng(seed)
    k_pages = rng.normal(size=(PAGES, PAGE, KVH, D)).astype(np.float32)
    v_pages = rng.normal(size=(PAGES, PAGE, KVH, D)).astype(np.float32)
    n_tokens = sum(q for _, q in seqs) + pad_tokens
    q = rng.normal(size=(n_tokens, H, D)).astype(np.float32)
    k_new = rng.normal(size=(n_tokens, KVH, D)).astype(np.float32)
    v_new = rng.normal(size=(n_tokens, KVH, D)).astype(np.float32)
    width = max(-(-(c + n) // PAGE) for c, n in seqs)
    n_seqs = len(seqs) + pad_seqs
    tables = np.full((n_seqs, width), PAGES, np.int32)
    free = list(rng.permutation(PAGES))
    ctx, starts, lens = np.zeros(n_seqs, np.int32), np.zeros(n_seqs, np.int32), np.zeros(n_seqs, np.int32)
    seq_ids = np.full(n_tokens, n_seqs, np.int32)
    at = 0
    for s, (c, n) in enumerate(seqs):
        pages = [free.pop() for _ in range(-(-(c + n) // PAGE))]
        tables[s, : len(pages)] = pages
        ctx[s], starts[s], lens[s] = c, at, n
        seq_ids[at : at + n] = s
        at += n
    starts[len(seqs) :] = at  # padding sequences: no tokens
    args = (q, k_new, v_new, k_pages, v_pages, tables, ctx, starts, lens, seq_ids)
    return [jnp.asarray(a) for a in args]


def one_by_one(q, k_new, v_new, k_pages, v_pages, tables, ctx, starts, lens, seq_ids, window=None):
    """Each sequence attended alone by the padded-row reference, in the flat layout (padding: zero)."""
    out = np.zeros(q.shape, np.float32)
    for s in range(len(lens)):
        a, n = int(starts[s]), int(lens[s])
        if n == 0:
            continue
        qs, ks, vs = (x[None, a : a + n] for x in (q, k_new, v_new))
        o = reference.paged_attention(qs, ks, vs, k_pages, v_pages, tables[s : s + 1], ctx[s : s + 1], window)
        out[a : a + n] = np.asarray(o[0])
    return out


MIXES = {
    "decodes": [(5, 1), (0, 1), (17, 1), (31, 1)],
    "prefills": [(0, 9), (0, 4), (0, 1)],
    "mixed": [(12, 1), (0, 7), (8, 5), (3, 1), (21, 11)],  # chunks crossing page boundaries, cached prefixes
    "long chunk": [(40, 1), (4, 30)],
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("window", [None, 6])
def test_ragged_reference_and_native_kernel_equal_each_sequence_alone(mix, window):
    args = ragged_case(MIXES[mix], seed=len(mix))
    want = one_by_one(*args, window=window)
    got_ref = reference.ragged_paged_attention(*args, max_q_len=32, sliding_window=window)
    np.testing.assert_allclose(np.asarray(got_ref), want, atol=2e-5)
    q, kn, vn, kp, vp, tables, ctx, starts, _, seq_ids = args
    native = jax.jit(native_paged.native_paged_attention, static_argnums=9)
    got = native(q, kn, vn, kp, vp, tables, ctx, starts, seq_ids, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    assert not np.asarray(got)[-3:].any()  # padding tokens: zero


def test_native_kernel_reads_the_stacked_cache_at_a_layer():
    q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids = ragged_case(MIXES["mixed"], seed=3)
    stack = lambda p: jnp.stack([jnp.zeros_like(p), p, -p])  # layer 1 holds the pool
    got = native_paged.native_paged_attention(q, kn, vn, stack(kp), stack(vp), tables, ctx, starts, seq_ids, None, 1)
    want = one_by_one(q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("window", [None, 6])
def test_pallas_ragged_kernel_equals_each_sequence_alone(mix, window):
    """The GPU kernel, run by the Pallas interpreter: the same mixes, with small tiles so that sequences span
    several query and key blocks (and a decode owns a block of which one row is real)."""
    args = ragged_case(MIXES[mix], seed=len(mix))
    want = one_by_one(*args, window=window)
    tiles = PrefillBlockSizes(block_q=4, block_k=8)
    got = pallas_ragged_paged_attention(*args, window, block_sizes=tiles, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    assert not np.asarray(got)[-3:].any()  # padding tokens: zero


def test_paged_attention_dispatches_ragged_batches_to_the_pallas_kernel():
    from jaxllm.kernels import Ragged, paged_attention

    q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids = ragged_case(MIXES["mixed"], seed=5)
    want = one_by_one(q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids)
    ragged = Ragged(starts, lens, seq_ids, 16)
    got = paged_attention(q[None], kn[None], vn[None], kp, vp, tables, ctx, ragged=ragged, impl="pallas-interpret")
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-5)


def test_the_pallas_ragged_check_passes_the_kernel_and_fails_a_wrong_or_failing_one(monkeypatch, caplog):
    """On a GPU the engine runs mixed steps only after the kernel has equalled the reference there; a kernel
    that is off, or whose compiler raises, fails the check with the reason logged, ragged batches take the
    reference, and the mixed step is off by default."""
    import jaxllm.kernels.attention as attention
    from jaxllm.kernels import Ragged, paged_attention

    monkeypatch.setattr(attention, "_RAGGED_BROKEN", set())
    check = attention.pallas_ragged_works.__wrapped__  # uncached
    assert check(interpret=True) and not attention._RAGGED_BROKEN
    real = attention.pallas_ragged_paged_attention
    monkeypatch.setattr(attention, "pallas_ragged_paged_attention", lambda *a, **k: real(*a, **k) * 1.01)
    assert not check(interpret=True)
    assert "largest difference from the reference" in caplog.text

    def refuses(*a, **k):
        raise RuntimeError("Mosaic lowering failed\nlong compiler output")

    monkeypatch.setattr(attention, "pallas_ragged_paged_attention", refuses)
    monkeypatch.setattr(attention, "_RAGGED_BROKEN", set())
    assert not check(interpret=True) and attention._RAGGED_BROKEN == {True}
    assert "RuntimeError: Mosaic lowering failed" in caplog.text and "long compiler output" not in caplog.text
    # Chosen by default (as 'pallas' is on a GPU), the failed kernel gives way to the reference.
    monkeypatch.setattr(attention, "default_impl", lambda: "pallas-interpret")
    q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids = ragged_case(MIXES["mixed"], seed=5)
    got = paged_attention(q[None], kn[None], vn[None], kp, vp, tables, ctx, ragged=Ragged(starts, lens, seq_ids, 16))
    want = one_by_one(q, kn, vn, kp, vp, tables, ctx, starts, lens, seq_ids)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-5)
    # and the engine's default: a GPU whose ragged kernel fails keeps separate calls
    monkeypatch.setattr(attention, "default_impl", lambda: "pallas")
    monkeypatch.setattr(attention, "pallas_ragged_works", lambda interpret=False: False)
    assert not attention.reads_to_length(ragged=True) and attention.reads_to_length(ragged=False)
    monkeypatch.setattr(attention, "pallas_ragged_works", lambda interpret=False: True)
    assert attention.reads_to_length(ragged=True)
