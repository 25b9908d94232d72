"""The output processor with no model: a scripted engine samples the tokens of a given text through the real
scheduler and its update; the processor turns them into deltas (text, stops, tool calls, logprob names)."""

from __future__ import annotations

import pytest

from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.output_processor import OutputProcessor
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Sampled, Sequence, TokenLogprob
from jaxllm.outputs import CompletionOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured.tool_calls import parse
from jaxllm.tokenizer import Tokenizer
from tests.conftest import write_byte_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Byte-level: every byte of a text is a token of its own, so multi-byte characters, stop strings and
    tool-call tags are split across tokens at every position."""
    folder = tmp_path_factory.mktemp("bytetok")
    write_byte_tokenizer(folder, 300)
    return Tokenizer.from_hf_folder(folder)


class ScriptedEngine:
    """Plays the model: each sequence samples the next tokens of its script (`decode_steps` per decode step),
    through the real `Scheduler.schedule` / `Scheduler.update`."""

    def __init__(self, decode_steps: int = 1):
        self.scheduler = Scheduler(4, 256, decode_steps=decode_steps, pool=PagePool(256, 16))
        self.scripts: dict[Sequence, list[int]] = {}

    def add(self, prompt: list[int], script: list[int], **params) -> Sequence:
        params = {"max_tokens": len(script), **params}
        seq = Sequence(f"req-{len(self.scripts)}", 0, prompt, SamplingParams(**params), 0, (EOS,), 4096)
        self.scripts[seq] = list(script)
        self.scheduler.add([seq])
        return seq

    def step(self):
        plan = self.scheduler.schedule()
        sampled = {}
        for s, steps in plan.sampling():
            at = len(s.output_ids)
            tokens = (self.scripts[s][at : at + steps] + [EOS] * steps)[:steps]
            lps = [TokenLogprob(t, -0.5, [(t, -0.5), (EOS, -2.0)]) for t in tokens] if s.params.logprobs else None
            sampled[s] = Sampled(tokens, lps)
        return self.scheduler.update(plan, sampled)

    def finish(self, seq, reason, stop_reason=None):
        self.scheduler.finish(seq, reason, stop_reason)

    def has_unfinished(self):
        return self.scheduler.has_work()


def run(tokenizer, text: str, decode_steps: int = 1, tool_format: str | None = None, **params):
    """All deltas of generating `text` (then EOS) for a one-token prompt, and the sequence."""
    engine, proc = ScriptedEngine(decode_steps), OutputProcessor(tokenizer)
    seq = engine.add([1], tokenizer.encode(text, add_special_tokens=False) + [EOS], **params)
    proc.add([seq], tool_format)
    deltas = []
    while engine.has_unfinished():
        deltas += proc.step(engine)
    assert len(proc) == 0, "the processor forgets a finished sequence"
    return deltas, seq


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_multibyte_characters_split_across_tokens_come_out_whole(tokenizer, steps):
    text = "héllo wörld — 日本語 🙂 ok"
    deltas, seq = run(tokenizer, text, steps)
    assert len(tokenizer.encode(text, add_special_tokens=False)) > len(text)  # characters span several tokens
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == EOS
    assert sum(len(d.token_ids) for d in deltas) == len(seq.output_ids)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_a_stop_string_split_across_tokens_is_never_shown_and_stops_the_sequence(tokenizer, steps):
    text = "The STOP sign, STOMP, then STOP here and more text after it"
    deltas, seq = run(tokenizer, text, steps, stop=["STOP here", "never"])
    shown = "".join(d.text for d in deltas)
    assert shown == "The STOP sign, STOMP, then "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "STOP here"
    # the engine finished it once the string was complete: the rest of the script was never sampled
    assert seq.finished and seq.stop_reason == "STOP here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(seq.output_ids) < text.index(" and more") + steps < len(ids)
    # text that only began like a stop string ("STOP sign", "STOMP") was held, then shown before the end
    assert "STOMP" in "".join(d.text for d in deltas[:-1])


def test_a_stop_string_at_the_length_limit_still_cuts(tokenizer):
    text = "abc END"
    deltas, _ = run(tokenizer, text, stop=["END"], max_tokens=len(text))
    assert "".join(d.text for d in deltas) == "abc " and deltas[-1].finish_reason == "stop"


def test_a_stop_token_ends_the_text_without_showing_and_min_tokens_holds_it_off(tokenizer):
    deltas, seq = run(tokenizer, "hi", skip_special_tokens=False)
    assert "".join(d.text for d in deltas) == "hi" and seq.stop_reason == EOS
    engine, proc = ScriptedEngine(), OutputProcessor(tokenizer)
    h, i = tokenizer.encode("hi", add_special_tokens=False)
    s = engine.add([1], [h, EOS, i, EOS], min_tokens=3, max_tokens=8)
    proc.add([s])
    deltas = []
    while engine.has_unfinished():
        deltas += proc.step(engine)
    assert s.output_ids == [h, EOS, i, EOS] and deltas[-1].stop_reason == EOS


def test_logprobs_carry_the_texts_of_their_tokens(tokenizer):
    deltas, _ = run(tokenizer, "ab", logprobs=2)
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in lps[:2]] == ["a", "b"]
    assert lps[0].top_tokens == ["a", "</s>"]


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_tool_calls_split_at_every_position_come_out_whole_with_the_content_around_them(tokenizer, steps):
    text = f"Let me check. {CALL}\n{CALL.replace('Paris', 'Oslo')} Done, wait for it."
    deltas, _ = run(tokenizer, text, steps, tool_format="hermes")
    want_content, want_calls = parse(text, "hermes")
    out = CompletionOutput(0, "", [], None)
    for d in deltas:
        out.add(d)
        assert "<tool_call" not in d.text and "get_weather" not in d.text
    assert out.text == want_content == "Let me check. \n Done, wait for it.".strip()
    assert [(c.name, c.arguments) for c in out.tool_calls] == [(c.name, c.arguments) for c in want_calls]
    assert out.finish_reason == "tool_calls"
    # each call as soon as it is closed, and the content after the calls before the end
    first = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert first < len(deltas) - 1
    assert "Done" in "".join(d.text for d in deltas[:-1])


def test_a_malformed_call_is_plain_content(tokenizer):
    text = 'Try <tool_call>{"name": "f", "arguments": {</tool_call> ok'
    deltas, _ = run(tokenizer, text, tool_format="hermes")
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == "stop" and not any(d.tool_calls for d in deltas)


def test_dropped_requests_give_no_more_deltas(tokenizer):
    engine, proc = ScriptedEngine(), OutputProcessor(tokenizer)
    a = engine.add([1], tokenizer.encode("aaaa", add_special_tokens=False))
    b = engine.add([1], tokenizer.encode("bbbb", add_special_tokens=False))
    proc.add([a])
    proc.add([b])
    proc.step(engine)
    engine.scheduler.abort(a.request_id)
    proc.drop(a.request_id)
    rest = []
    while engine.has_unfinished():
        rest += proc.step(engine)
    assert {d.request_id for d in rest} == {b.request_id} and len(proc) == 0
