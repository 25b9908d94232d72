"""The mixed step: a step's decodes and prefill chunks in one model call give what separate prefill and decode
calls give, token for token, across ragged mixes, chunk and page boundaries, prefix hits and preemption."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.kv_cache import bytes_per_token

SHARED = "the quick brown fox jumps over the lazy dog " * 2
PROMPTS = [SHARED + "and then", SHARED + "but later", "hello there the", "xyz", SHARED + "and then", "a" * 150]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=20, min_tokens=20, logprobs=2),
    SamplingParams(temperature=0.9, seed=5, max_tokens=20, n=2, top_p=0.9),
    SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 3}),
    SamplingParams(temperature=0.7, seed=11, max_tokens=20, top_k=5, min_tokens=3),
    SamplingParams(temperature=0, max_tokens=20, min_tokens=20, logprobs=2),
    SamplingParams(temperature=0, max_tokens=30, presence_penalty=0.7),
]


def _run(folder, mixed: bool, tight: bool, scan_layers: bool):
    kw = dict(scan_layers=scan_layers, token_budget=64, page_size=16)  # the 150-token prompt comes in chunks
    if tight:  # 14 pages for 4 slots: sequences are preempted and recomputed
        cfg = LLM(folder, progress=False).config
        kw.update(kv_cache_memory=14 * 16 * bytes_per_token(cfg, "float32") / 2**30, max_model_len=192, max_num_seqs=4)
    llm = LLM(folder, progress=False, mixed_step=mixed, **kw)
    steps = []
    llm.engine.on_step = steps.append
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    ids = [[c.token_ids for c in o.outputs] for o in outs]
    logprobs = [(t.logprob, [lp for _, lp in t.top]) for o in outs for c in o.outputs for t in (c.logprobs or [])]
    return ids, logprobs, llm, steps


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scan_layers", "tight"), [(True, True), (False, False)], ids=["scan-preempting", "unrolled-roomy"]
)
def test_mixed_steps_generate_what_separate_prefill_and_decode_calls_do(tiny_models, tight, scan_layers):
    folder = str(tiny_models["llama"][0])
    ids_sep, lp_sep, _, steps_sep = _run(folder, False, tight, scan_layers)
    ids, lp, llm, steps = _run(folder, True, tight, scan_layers)
    assert ids == ids_sep  # greedy and seeded tokens alike
    flat = lambda lps: np.array([x for chosen, top in lps for x in (chosen, *top)])
    np.testing.assert_allclose(flat(lp), flat(lp_sep), atol=1e-5)
    assert not any(s.mixed for s in steps_sep) and not any(s.prefills for s in steps)
    mixed = [s.mixed for s in steps if s.mixed is not None]
    real = [b.q_lens > 0 for b in mixed]
    assert any((b.decoding & r).any() and (~b.decoding & r).any() for b, r in zip(mixed, real, strict=True))
    assert any((~b.sample & r).any() for b, r in zip(mixed, real, strict=True))  # a chunk that is not the last
    assert any(((b.ctx_lens % 16) + b.q_lens > 16)[r & ~b.decoding].any() for b, r in zip(mixed, real, strict=True))
    sched = llm.engine.scheduler
    assert sched.pool.hits > 0 and (sched.preemptions > 0) == tight
