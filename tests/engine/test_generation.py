"""Generation through the engine with the real SmolLM2: seeds, stops, n, logprobs, streaming, errors."""

from __future__ import annotations

import pytest

from jaxllm import ContextLengthError, InvalidRequestError, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is 2+2?",
    "Name a color.",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "Say hello in French.",
    "What is the largest planet?",
    "Give me a random word.",
    "Count to five.",
]


def _prompts(llm):
    return [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_same_seed_same_output_alone_and_in_a_batch_of_8(smollm2):
    prompts = _prompts(smollm2)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1000 + i) for i in range(8)]
    batched = smollm2.generate(prompts, params, use_tqdm=False)
    for i in (0, 3, 7):
        alone = smollm2.generate(prompts[i], params[i], use_tqdm=False)
        assert alone[0].outputs[0].token_ids == batched[i].outputs[0].token_ids
    assert len({tuple(b.outputs[0].token_ids) for b in batched}) > 1


def test_different_seeds_give_different_samples(smollm2):
    p = _prompts(smollm2)[6]
    outs = {
        tuple(
            smollm2.generate(p, SamplingParams(temperature=1.0, max_tokens=12, seed=s), use_tqdm=False)[0]
            .outputs[0]
            .token_ids
        )
        for s in range(4)
    }
    assert len(outs) > 1


def test_stop_string_truncates_and_reports_stop(smollm2):
    p = smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    full = smollm2.generate(p, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in full.text
    out = smollm2.generate(p, SamplingParams(temperature=0, max_tokens=32, stop=["Paris"]), use_tqdm=False)[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == "Paris"
    assert o.text == full.text[: full.text.index("Paris")]


def test_stop_token_ids_and_max_tokens(smollm2):
    p = smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    full = smollm2.generate(p, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    third = full.token_ids[2]
    o = smollm2.generate(p, SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[third]), use_tqdm=False)[
        0
    ].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == third and o.token_ids == full.token_ids[:3]
    o = smollm2.generate(p, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "length" and o.token_ids == full.token_ids[:5]
    assert full.finish_reason == "stop" and full.token_ids[-1] in smollm2.config.eos_token_ids


def test_n_logprobs_and_usage(smollm2):
    p = _prompts(smollm2)[1]
    out = smollm2.generate(p, SamplingParams(temperature=1.0, n=2, max_tokens=8, logprobs=3, seed=5), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1]
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for lp, tok in zip(o.logprobs, o.token_ids, strict=True):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
            assert lp.top[0][1] >= lp.logprob - 1e-5
    assert out.usage.completion_tokens == sum(len(o.token_ids) for o in out.outputs)
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)


def test_stream_equals_generate(smollm2):
    p = _prompts(smollm2)[2]
    params = SamplingParams(temperature=0.7, max_tokens=40, seed=3)
    final = smollm2.generate(p, params, use_tqdm=False)[0].outputs[0]
    deltas = list(smollm2.stream(p, params))
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert deltas[-1].finish_reason == final.finish_reason


def test_prompt_too_long_is_a_context_error(smollm2):
    with pytest.raises(ContextLengthError):
        smollm2.generate([5] * (smollm2.max_model_len + 1), SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        smollm2.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)


def test_chunked_prefill_gives_the_same_output(smollm2_path):
    from jaxllm import LLM

    whole = LLM(str(smollm2_path), progress=False, max_model_len=512)
    chunked = LLM(loaded=whole.loaded, max_model_len=512, token_budget=24)
    prompt = whole.apply_chat_template([{"role": "user", "content": "Explain, in a few sentences, " * 6 + "tides."}])
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    a = whole.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    b = chunked.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(whole.tokenizer.encode(prompt)) > 3 * 24
    assert chunked.engine.prefilled_tokens == whole.engine.prefilled_tokens
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert abs(x.logprob - y.logprob) < 1e-3
