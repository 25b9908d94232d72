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


MODES = 10


def _random_params(rng, mode: int) -> SamplingParams:
    """Sampling mode `mode` of the MODES a server meets, its values drawn at random."""
    base = dict(max_tokens=int(rng.integers(1, 24)), ignore_eos=bool(rng.integers(2)))
    return SamplingParams(
        **base
        | [
            dict(temperature=0),
            dict(temperature=0.8, top_p=0.9, seed=int(rng.integers(1000))),
            dict(temperature=1.0, top_k=5, min_p=0.05),
            dict(temperature=0, logprobs=int(rng.integers(0, 4))),
            dict(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.5, logit_bias={5: 2.0}),
            dict(
                temperature=0,
                min_tokens=min(3, base["max_tokens"]),
                frequency_penalty=0.3,
                stop_token_ids=[7, 11],
                stop=["x"],
            ),
            dict(temperature=0.9, n=int(rng.integers(2, 4)), logprobs=1),
            dict(temperature=0, prompt_logprobs=int(rng.integers(0, 3)), max_tokens=int(rng.integers(0, 3))),
            dict(temperature=0, regex="[a-z]{1,30}"),  # a grammar, with the plain sampler
            dict(temperature=0.8, seed=int(rng.integers(1000)), choice=["yes", "no", "maybe"], presence_penalty=0.3),
        ][mode],
    )


@pytest.mark.slow
def test_after_warmup_a_random_serving_workload_compiles_nothing(tiny_models):
    """Arrivals over time, prompts of 1-2,000 tokens (some sharing prefixes), n, every sampling mode, logprobs,
    prompt logprobs (scoring), grammars, penalties, stops, cancellations and preemption: after `warmup`, no step
    compiles anything."""
    import jax
    import numpy as np

    from jaxllm.engine.kv_cache import bytes_per_token

    folder, _ = tiny_models["llama"]
    cfg = LLM(str(folder), progress=False).config
    pages = 200  # 3,200 tokens for 4 sequences of up to 2,048: long prompts preempt each other
    llm = LLM(
        str(folder),
        max_model_len=2048,
        max_num_seqs=4,
        token_budget=256,
        decode_steps=2,
        mixed_step=True,
        kv_cache_memory=pages * 16 * bytes_per_token(cfg, "float32") / 2**30,
        progress=False,
    )
    engine = llm.engine
    shapes, seconds = engine.warmup()
    surface = engine.surface
    grammar = surface.grammar_shapes()
    assert shapes == len(surface.mixed_shapes()) + len(surface.decode_shapes()) + len(grammar) and seconds > 0
    # grammar steps: a model half per model shape (not per sampler variant), a sampling half per shape
    mixed_grammar = [g for g in grammar if not hasattr(g, "steps")]
    warm = {
        "mixed": len(surface.mixed_shapes()),
        "decode": 12 // 2,
        "mixed_forward": len({(g.tokens, g.seqs, g.context, g.scoring) for g in mixed_grammar}),
        "mixed_sample": len(mixed_grammar),
        "decode_forward": (len(grammar) - len(mixed_grammar)) // 2,
        "decode_sample": len(grammar) - len(mixed_grammar),
    }
    assert dict(llm.runner.compiles) == warm

    # Every compilation XLA runs, or looks up in the persistent cache (which the tests share), is an event.
    compiled, listening = [], [True]
    watched = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/compile_requests_use_cache")

    def on_event(event, *args, **kwargs):
        if listening[0] and event in watched:
            compiled.append(event)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    rng = np.random.default_rng(0)
    shared = rng.integers(3, cfg.vocab_size, 900).tolist()
    arrivals, finished, aborted, scoring, constrained = 30, 0, 0, 0, 0
    live: list[str] = []
    while arrivals or engine.has_unfinished():
        if arrivals and rng.random() < 0.3:
            length = int(rng.integers(1, 2001))
            prompt = rng.integers(3, cfg.vocab_size, length).tolist()
            if rng.random() < 0.3:
                prompt = shared[: min(length, len(shared))] + prompt[len(shared) :]
            seqs = engine.add_request(prompt, _random_params(rng, arrivals % MODES))  # every mode, in turn
            live.append(seqs[0].request_id)
            scoring += seqs[0].prompt_logprobs is not None
            constrained += seqs[0].matcher is not None
            arrivals -= 1
        if live and rng.random() < 0.04:
            aborted += bool(engine.abort(live.pop(int(rng.integers(len(live))))))
        finished += sum(u.finished for u in engine.step())
    listening[0] = False
    assert compiled == [], f"{len(compiled)} compilations after warm-up"
    assert dict(llm.runner.compiles) == warm
    assert engine.scheduler.preemptions > 0 and aborted > 0 and finished > 0 and scoring > 0 and constrained > 0
