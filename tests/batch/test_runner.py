"""The streaming batch loop on a tiny random-weight Llama (in-process): bounded, streaming, and right."""

from __future__ import annotations

import json

import pytest

from jaxllm.batch.lines import parse_line
from jaxllm.batch.runner import BatchRunner
from jaxllm.errors import InvalidRequestError
from jaxllm.sampling_params import SamplingParams

GREEDY = {"temperature": 0, "max_tokens": 6}


def lines(n: int, **fields) -> list[str]:
    return [json.dumps({"id": f"r{i}", "prompt": f"request {i} says", **fields}) for i in range(n)]


def items(texts, counter=None, defaults=GREEDY):
    """The parsed items of `texts`, read lazily; counter['read'] says how many were taken."""
    for lineno, text in enumerate(texts, 1):
        if counter is not None:
            counter["read"] += 1
        yield parse_line(text, lineno, defaults)


def test_never_holds_more_than_its_window(tiny_llm):
    window, counter, seen = 3, {"read": 0}, []

    def sink(record, ok):
        seen.append((runner.in_flight, counter["read"] - len(seen)))

    runner = BatchRunner(tiny_llm, sink, window=window)
    stats = runner.run(items(lines(24), counter))
    assert stats.done == 24 and counter["read"] == 24
    assert max(n for n, _ in seen) <= window
    assert max(unanswered for _, unanswered in seen) <= window  # read from the input but not handed out yet
    assert max(unanswered for _, unanswered in seen) == window  # and the window is used
    assert not tiny_llm.engine.has_unfinished()


def test_records_come_out_as_requests_finish(tiny_llm):
    counter, first = {"read": 0}, []
    texts = [json.dumps({"id": "long", "prompt": "a long one", "max_tokens": 40})] + lines(7)

    def sink(record, ok):
        if not first:
            first.append((record["id"], tiny_llm.engine.has_unfinished(), counter["read"]))

    BatchRunner(tiny_llm, sink, window=4).run(items(texts, counter))
    rid, running, read = first[0]
    assert rid != "long"  # completion order: a short request is out before the long first one
    assert running and read < len(texts)  # written while others still ran and before the input was all read


def test_ordered_keeps_input_order(tiny_llm):
    texts = [json.dumps({"id": "long", "prompt": "a long one", "max_tokens": 40})] + lines(5) + ["not json"]
    records = []
    BatchRunner(tiny_llm, lambda r, ok: records.append(r), window=3, ordered=True).run(items(texts))
    assert [r.get("custom_id", r["id"]) for r in records] == ["long", "r0", "r1", "r2", "r3", "r4", 7]


def test_records_match_generate(tiny_llm):
    texts = [*lines(3), json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}]})]
    records = {}
    BatchRunner(tiny_llm, lambda r, ok: records.update({r["id"]: r})).run(items(texts))
    prompts = [f"request {i} says" for i in range(3)] + [
        tiny_llm.apply_chat_template([{"role": "user", "content": "hi"}])
    ]
    outs = tiny_llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    for key, out in zip(["r0", "r1", "r2", "chat"], outs, strict=True):
        r = records[key]
        assert r["token_ids"] == out.outputs[0].token_ids and r["text"] == out.outputs[0].text
        assert r["usage"]["prompt_tokens"] == len(out.prompt_token_ids)


def test_a_request_longer_than_the_cache_waits_for_it_to_grow(tiny_llm):
    texts = lines(3) + [json.dumps({"id": "long", "prompt": "x", "max_tokens": 200, "ignore_eos": True})]
    records = {}
    runner = BatchRunner(tiny_llm, lambda r, ok: records.update({r["id"]: r}), window=3)
    runner.run(items(texts))
    assert len(records["long"]["token_ids"]) == 200 and len(records) == 4


def test_requests_the_model_refuses_become_error_records(tiny_llm):
    texts = [
        json.dumps({"id": "too-long", "prompt": "word " * 300}),
        json.dumps(
            {"custom_id": "c", "url": "/v1/completions", "body": {"model": "m", "prompt": "hi", "max_tokens": 999}}
        ),
        *lines(2),
    ]
    out = []
    stats = BatchRunner(tiny_llm, lambda r, ok: out.append((r, ok))).run(items(texts))
    assert (stats.done, stats.failed) == (2, 2)
    errors = {r["custom_id"]: r for r, ok in out if not ok}
    assert "line 1:" in errors["too-long"]["error"]["message"] and errors["too-long"]["response"] is None
    assert errors["c"]["response"]["status_code"] == 400 and errors["c"]["error"]["code"] == "context_length_exceeded"


def test_strict_stops_at_the_first_and_leaves_the_engine_idle(tiny_llm):
    texts = [*lines(3, max_tokens=30), json.dumps({"id": "too-long", "prompt": "word " * 300}), *lines(2)]
    out = []
    runner = BatchRunner(tiny_llm, lambda r, ok: out.append(r), window=2, strict=True, name="in.jsonl")
    with pytest.raises(InvalidRequestError, match=r"^in.jsonl line 4: the prompt has \d+ tokens"):
        runner.run(items(texts))
    assert len(out) < 3  # line 3 was running when line 4 stopped the job...
    assert not tiny_llm.engine.has_unfinished() and len(tiny_llm.outputs) == 0  # ...and was aborted
    assert BatchRunner(tiny_llm, lambda r, ok: None).run(items(lines(2))).done == 2  # and usable again
