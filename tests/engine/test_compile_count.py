"""Bucketed shapes bound the number of compilations: each shape a workload meets compiles once, and twenty
prompt lengths meet fewer shapes than twenty."""

from __future__ import annotations

import pytest

from jaxllm import LLM, SamplingParams


def _shapes(llm) -> tuple[set, set]:
    """Record the static shape of every prefill call or mixed step, and of every decode, the engine dispatches."""
    mixed, decode = set(), set()

    def on_step(inputs):
        for b in inputs.prefills:
            mixed.add((b.tokens.shape, b.ctx_len, b.flags))
        if inputs.mixed is not None:
            b = inputs.mixed
            mixed.add((b.tokens.shape[0], b.slots.shape[0], b.ctx_len, b.flags))
        if inputs.decode is not None:
            b = inputs.decode
            decode.add((b.rows, b.attn_len, b.n_steps, b.flags))

    llm.engine.on_step = on_step
    return mixed, decode


@pytest.mark.slow
@pytest.mark.parametrize("mixed_step", [True, False], ids=["mixed", "separate"])
def test_twenty_prompt_lengths_compile_once_per_bucket(tiny_models, mixed_step):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), max_model_len=256, prefix_caching=False, progress=False, mixed_step=mixed_step)
    llm.engine.reserve(1, 256)
    mixed, decode = _shapes(llm)
    lengths = [3 + 11 * i for i in range(20)]  # 3 .. 212
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for n in lengths:
        out = llm.generate([7] * n, params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 6
    assert len(mixed) < len(lengths) and len(decode) < len(lengths)
    first = llm.runner.compiles["mixed" if mixed_step else "prefill"]
    assert first == len(mixed) and llm.runner.compiles["decode"] == len(decode)
    before = dict(llm.runner.compiles)
    for n in lengths:  # the same shapes again: nothing new compiles
        llm.generate([9] * n, params, use_tqdm=False)
    assert dict(llm.runner.compiles) == before


@pytest.mark.slow
@pytest.mark.parametrize("mixed_step", [True, False], ids=["mixed", "separate"])
def test_prefix_hits_compile_once_per_length_and_context_bucket(tiny_models, mixed_step):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), max_model_len=256, page_size=8, progress=False, mixed_step=mixed_step)
    llm.engine.reserve(1, 256)
    mixed, _ = _shapes(llm)
    lengths = [3 + 11 * i for i in range(20)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for n in lengths:  # every prompt extends the previous one: each finds a cached prefix
        llm.generate([7] * n, params, use_tqdm=False)
    assert llm.engine.scheduler.pool.hits > 0
    # Twenty prompts, most of them only their uncached rest, fall into fewer buckets; each compiles once.
    first = llm.runner.compiles["mixed" if mixed_step else "prefill"]
    assert len(mixed) < len(lengths) and first == len(mixed)
    before = dict(llm.runner.compiles)
    for n in lengths:
        llm.generate([7] * n, params, use_tqdm=False)
    assert dict(llm.runner.compiles) == before
