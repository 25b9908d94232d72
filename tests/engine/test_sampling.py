"""The on-device sampler: greedy, top-k/top-p/min-p masks, penalties, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine.runner import flags_for, row_params
from jaxllm.engine.sampling import (
    SamplerFlags,
    apply_penalties,
    filter_logits,
    first_argmax,
    gumbel_sample,
    row_keys,
    sample,
)
from jaxllm.errors import InvalidSamplingParamsError
from jaxllm.sampling_params import SamplingParams

ALL = SamplerFlags(sample=True, filters=True, penalties=True)


def _rp(*params, seeds=None):
    return row_params(list(params), seeds or [0] * len(params), len(params))


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 50)).astype(np.float32))
    p = SamplingParams(temperature=1.3, top_k=1)
    steps = jnp.arange(6)
    for seed in range(5):
        toks, _ = sample(logits, _rp(*[p] * 6, seeds=[seed] * 6), steps, flags_for([p]))
        np.testing.assert_array_equal(np.asarray(toks), np.argmax(np.asarray(logits), -1))


def test_top_p_mask_on_hand_built_logits():
    probs = np.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    # Cumulative before each token: 0, .5, .7, .85, .95 -> top_p .7 keeps tokens whose prefix < .7.
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([0]), jnp.array([0.7]), jnp.array([0.0]))))
    np.testing.assert_array_equal(kept[0], [True, True, False, False, False])
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([0]), jnp.array([0.71]), jnp.array([0.0]))))
    np.testing.assert_array_equal(kept[0], [True, True, True, False, False])
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([0]), jnp.array([0.01]), jnp.array([0.0]))))
    np.testing.assert_array_equal(kept[0], [True, False, False, False, False])


def test_min_p_mask_on_hand_built_logits():
    probs = np.array([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    # min_p .3 keeps tokens with p >= .3 * .4 = .12.
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([0]), jnp.array([1.0]), jnp.array([0.3]))))
    np.testing.assert_array_equal(kept[0], [False, True, True, True, False])


def test_top_k_mask_per_row():
    logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    kept = np.isfinite(
        np.asarray(filter_logits(logits, jnp.array([2, 3]), jnp.array([1.0, 1.0]), jnp.array([0.0, 0.0])))
    )
    np.testing.assert_array_equal(kept, [[False, True, False, True], [True, True, True, False]])


def test_penalties_change_logits_exactly_as_defined():
    logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0, 0.5]])
    prompt_mask = jnp.asarray([[True, True, False, False, False]])
    counts = jnp.asarray([[0, 0, 3, 1, 0]], jnp.int32)
    bias = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 5.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = np.asarray(apply_penalties(logits, _rp(p), prompt_mask, counts, bias))
    # token 0: seen in prompt, positive -> /2; token 1: seen, negative -> *2;
    # token 2: output x3, positive -> /2 then -0.25*3 - 0.5; token 3: output x1, negative -> *2 -0.25 -0.5;
    # token 4: unseen, bias +5.
    np.testing.assert_allclose(out[0], [1.0, -4.0, 0.5 - 0.75 - 0.5, -2.0 - 0.25 - 0.5, 5.5], atol=1e-6)


def test_first_argmax_equals_argmax_with_ties_and_masked_rows():
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(16, 300)).astype(np.float32)  # many ties
    x[3] = -np.inf  # a fully masked row picks token 0, as argmax does
    x[4, :10] = -np.inf
    got = np.asarray(first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, -1))
    assert got.dtype == np.int32


def test_gumbel_sample_draws_what_jax_random_categorical_draws():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(32, 500)).astype(np.float32))
    keys = row_keys(jnp.arange(32, dtype=jnp.uint32), jnp.full((32,), 5))
    ours = jax.vmap(gumbel_sample)(keys, logits)
    theirs = jax.vmap(jax.random.categorical)(keys, logits)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_same_seed_same_draws_regardless_of_batch_neighbours():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 100)).astype(np.float32)
    p = SamplingParams(temperature=1.0)
    seeds = list(range(100, 108))
    batch, _ = sample(jnp.asarray(logits), _rp(*[p] * 8, seeds=seeds), jnp.full((8,), 3), flags_for([p]))
    for i in range(8):
        alone, _ = sample(jnp.asarray(logits[i : i + 1]), _rp(p, seeds=[seeds[i]]), jnp.full((1,), 3), flags_for([p]))
        assert int(alone[0]) == int(batch[i])


def test_sampling_follows_the_distribution():
    logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1]]))
    p = SamplingParams(temperature=1.0)
    draw = jax.jit(lambda rp: sample(logits, rp, jnp.zeros((1,), jnp.int32), flags_for([p]))[0][0])
    draws = [int(draw(_rp(p, seeds=[s]))) for s in range(400)]
    freq = np.bincount(draws, minlength=3) / 400
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.08)


def test_min_tokens_suppresses_stop_tokens_until_reached():
    logits = jnp.asarray([[0.0, 0.0, 10.0, 1.0]] * 2)
    p = SamplingParams(temperature=0, min_tokens=2)
    stop = jnp.asarray([False, False, True, False])
    toks, _ = sample(logits, _rp(p, p), jnp.asarray([1, 2]), SamplerFlags(min_tokens=True), stop_mask=stop)
    assert toks.tolist() == [3, 2]


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32))
    p = SamplingParams(temperature=0, logprobs=5)
    toks, (chosen, top_ids, top_lp) = sample(logits, _rp(p, p), jnp.zeros((2,), jnp.int32), flags_for([p]))
    ref = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen), ref.max(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(top_ids)[:, 0], ref.argmax(-1))
    np.testing.assert_allclose(np.asarray(top_lp)[:, :5], -np.sort(-ref, -1)[:, :5], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=2.0),
        dict(top_k=-1),
        dict(max_tokens=-1),
        dict(prompt_logprobs=-1),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=3.0),
        dict(n=0),
        dict(logprobs=50),
        dict(logit_bias={5: 200.0}),
        dict(min_tokens=10, max_tokens=5),
        dict(stop=[""]),
    ],
)
def test_invalid_values_raise_a_typed_error(kwargs):
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)


BATCHES = {
    "greedy": [SamplingParams(temperature=0)] * 3,
    "greedy with logprobs": [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)],
    "sampled, some filtered": [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.1, top_k=5, top_p=0.9),
        SamplingParams(temperature=0),
    ],
    "penalties and min_tokens": [
        SamplingParams(temperature=0, repetition_penalty=1.4, frequency_penalty=0.6, logit_bias={3: 4.0}),
        SamplingParams(temperature=0.7, presence_penalty=0.9, min_tokens=9, logprobs=2),
    ],
}


@pytest.mark.parametrize("batch", BATCHES)
def test_the_one_runtime_variant_samples_what_each_batchs_own_variant_does(batch):
    from jaxllm.engine.runner import two_variants

    plist = BATCHES[batch]
    rng = np.random.default_rng(1)
    n, v = len(plist), 64
    logits = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 3)
    rp = _rp(*plist, seeds=list(range(7, 7 + n)))
    steps = jnp.arange(n, dtype=jnp.int32)
    mask = jnp.asarray(rng.random((n, v)) < 0.2)
    counts = jnp.asarray(rng.integers(0, 3, (n, v)).astype(np.int32))
    bias = np.zeros((n, v), np.float32)
    for i, p in enumerate(plist):
        for tok, b in p.logit_bias.items():
            bias[i, tok] = b
    stop = jnp.zeros((v,), bool).at[jnp.argmax(logits, -1)].set(True)
    kw = dict(prompt_mask=mask, counts=counts, bias=jnp.asarray(bias), stop_mask=stop)
    own, own_info = sample(logits, rp, steps, flags_for(plist), **kw)
    every, every_info = jax.jit(lambda lg: sample(lg, rp, steps, SamplerFlags.every(), **kw))(logits)
    np.testing.assert_array_equal(np.asarray(own), np.asarray(every))
    assert (own_info is None) == (not any(p.logprobs is not None for p in plist))
    if own_info is not None:
        for a, b in zip(own_info, every_info, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert two_variants(plist) == (SamplerFlags() if batch == "greedy" else SamplerFlags.every())
