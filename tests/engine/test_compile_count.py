"""Bucketed shapes bound the number of compilations."""

from __future__ import annotations

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import buckets


@pytest.mark.slow
def test_twenty_prompt_lengths_compile_at_most_the_buckets(tiny_models):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), max_model_len=256, prefix_caching=False, progress=False)
    llm.engine.reserve(1, 256)
    lengths = [3 + 11 * i for i in range(20)]  # 3 .. 212
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for n in lengths:
        out = llm.generate([7] * n, params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 6
    prefill_buckets = {buckets.seq_bucket(n, 256) for n in lengths}
    attn_buckets = {buckets.attn_bucket(n + k, 256) for n in lengths for k in range(0, 8)}
    assert llm.runner.compiles["prefill"] <= len(prefill_buckets)
    assert llm.runner.compiles["decode"] <= len(attn_buckets)
    before = dict(llm.runner.compiles)
    for n in lengths:  # the same shapes again: nothing new compiles
        llm.generate([9] * n, params, use_tqdm=False)
    assert dict(llm.runner.compiles) == before


@pytest.mark.slow
def test_prefix_hits_compile_at_most_one_variant_per_length_and_context_bucket(tiny_models):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), max_model_len=256, page_size=8, progress=False)
    llm.engine.reserve(1, 256)
    lengths = [3 + 11 * i for i in range(20)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    shapes = set()  # the (length bucket, context bucket) of every prefill call
    llm.engine.on_step = lambda inputs: shapes.update((b.tokens.shape[1], b.ctx_len) for b in inputs.prefills)
    for n in lengths:  # every prompt extends the previous one: each finds a cached prefix
        llm.generate([7] * n, params, use_tqdm=False)
    assert llm.engine.scheduler.pool.hits > 0
    # Twenty prompts fall into fewer (length, context) buckets, and each bucket compiles once.
    assert len(shapes) < len(lengths) and {c for _, c in shapes} - {0}
    assert llm.runner.compiles["prefill"] == len(shapes)
    before = dict(llm.runner.compiles)
    for n in lengths:
        llm.generate([7] * n, params, use_tqdm=False)
    assert dict(llm.runner.compiles) == before
