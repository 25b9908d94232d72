"""Constrained decoding with the real SmolLM2: JSON schemas validate, regexes and choices match, a grammar's
end finishes the output, and free rows beside constrained ones generate exactly what they do alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.errors import InvalidRequestError, InvalidSamplingParamsError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "pets"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Give me a JSON record of a pet owner.", "Who are you? Answer in JSON."]


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(loaded=smollm2.loaded, max_num_seqs=8, max_model_len=512)


def _chat(llm, prompts, params, **kw):
    return [o.outputs[0] for o in llm.chat([[{"role": "user", "content": p}] for p in prompts], params, **kw)]


@pytest.mark.slow
def test_json_schema_outputs_always_validate(llm):
    for seed in (0, 1):
        params = SamplingParams(max_tokens=160, temperature=0.8, seed=seed, json_schema=SCHEMA)
        for out in _chat(llm, PROMPTS, params, use_tqdm=False):
            assert out.finish_reason == "stop", out
            jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.slow
def test_regex_choice_and_json_object(llm):
    out = _chat(llm, ["What is 12 times 12?"], SamplingParams(max_tokens=20, temperature=0, regex=r"[0-9]{1,4}"))[0]
    assert re.fullmatch(r"[0-9]{1,4}", out.text), out
    choices = ["positive", "negative", "neutral"]
    out = _chat(llm, ["'I love it!' Sentiment?"], SamplingParams(max_tokens=8, temperature=0, choice=choices))[0]
    assert out.text in choices and out.finish_reason == "stop"
    out = _chat(llm, ["A JSON object, please."], SamplingParams(max_tokens=120, temperature=0, json_object=True))[0]
    assert isinstance(json.loads(out.text), dict), out


@pytest.mark.slow
def test_free_rows_beside_constrained_rows_generate_what_they_do_alone(llm):
    free = SamplingParams(max_tokens=24, temperature=0.7, seed=5)
    alone = _chat(llm, PROMPTS[:2], free, use_tqdm=False)
    constrained = SamplingParams(max_tokens=24, temperature=0.7, seed=5, choice=["yes", "no"])
    mixed = llm.chat(
        [[{"role": "user", "content": p}] for p in [PROMPTS[0], "Yes or no?", PROMPTS[1]]],
        [free, constrained, free],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.token_ids for o in alone]
    assert mixed[1].outputs[0].text in ("yes", "no")


def test_bad_constraints_are_refused_before_queueing(llm):
    with pytest.raises(InvalidRequestError, match="regex"):
        llm.generate("x", SamplingParams(max_tokens=4, regex="(unclosed"), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError, match="at most one output constraint"):
        SamplingParams(regex="a", choice=["a"])
    assert not llm.engine.has_unfinished()


def test_free_only_batches_compile_nothing_new_around_constrained_ones(tiny_models):
    """After a warm-up of the free surface only, free requests compile nothing; a constrained one compiles its
    own variant (the model and sampling halves); free ones after it still compile nothing (the constrained
    variant never replaces theirs). With the whole surface warmed up, see test_compile_count."""
    llm = LLM(str(tiny_models["llama"][0]), max_num_seqs=2, max_model_len=64, token_budget=32, progress=False)
    llm.engine.warmup(grammar=False)
    free = SamplingParams(max_tokens=6, temperature=0.0)
    run = lambda params: llm.generate([[1, 17, 42, 99, 5]], params, use_tqdm=False)[0].outputs[0]
    warm = dict(llm.runner.compiles)
    first = run(free).token_ids
    assert dict(llm.runner.compiles) == warm
    out = run(SamplingParams(max_tokens=6, temperature=0.0, choice=["ab", "cd"]))
    assert out.text in ("ab", "cd") and out.finish_reason == "stop"
    constrained = dict(llm.runner.compiles)
    assert {k: v for k, v in constrained.items() if k in warm} == warm and constrained["mixed_forward"] > 0
    assert run(free).token_ids == first
    assert dict(llm.runner.compiles) == constrained


@pytest.mark.slow
def test_chat_with_tools_returns_the_calls(llm):
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    out = llm.chat(ask, SamplingParams(max_tokens=60, temperature=0), tools=tools, tool_choice="required")[0]
    c = out.outputs[0]
    assert c.finish_reason == "tool_calls" and [t.name for t in c.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads(c.tool_calls[0].arguments), weather)
    free = llm.chat(ask, SamplingParams(max_tokens=8, temperature=0), tools=tools, tool_choice="none")[0].outputs[0]
    assert free.tool_calls is None


@pytest.mark.parametrize("mixed_step", [True, False], ids=["mixed", "separate"])
def test_overlapped_masks_decode_every_step_and_sample_what_waiting_does(tiny_models, mixed_step):
    """With `overlap_masks` a constrained row decodes every step (its mask computed while the model runs), where
    waiting for its token decodes it every other step; both give the same tokens, greedy and sampled, for
    constrained and free rows in one batch."""
    folder = str(tiny_models["llama"][0])
    params = [
        SamplingParams(max_tokens=16, temperature=0.0, regex="[a-z]{5,40}"),
        SamplingParams(max_tokens=16, temperature=0.9, seed=4, regex="(ab|cd|[0-9])+"),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, seed=2, ignore_eos=True, presence_penalty=0.4),
    ]
    prompts = [[1, 17, 42, 99, 5], [1, 8, 9], [1, 30, 31, 32], [1, 5]]
    outs, steps = {}, {}
    for overlap in (False, True):
        llm = LLM(
            folder, max_num_seqs=4, max_model_len=64, mixed_step=mixed_step, overlap_masks=overlap, progress=False
        )
        done = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        outs[overlap] = [c.token_ids for c in done]
        text, reason = done[0].text, done[0].finish_reason
        assert re.fullmatch("[a-z]*", text) and (reason == "length" or re.fullmatch("[a-z]{5,40}", text))
        llm.engine.add_request(prompts[0], params[0])
        steps[overlap] = 0
        while llm.engine.has_unfinished():
            llm.engine.step()
            steps[overlap] += 1
    assert outs[True] == outs[False]
    assert all(len(t) == 16 for t in outs[True][2:])
    assert steps[True] <= 0.6 * steps[False], steps


def test_a_grammar_not_complete_within_max_tokens_ends_with_length(tiny_models):
    llm = LLM(str(tiny_models["llama"][0]), max_num_seqs=2, max_model_len=64, progress=False)
    params = SamplingParams(max_tokens=5, temperature=0.0, regex="[a-z]{40}")
    out = llm.generate([[1, 17, 42]], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and re.fullmatch("[a-z]+", out.text)
    assert not llm.engine.has_unfinished()
