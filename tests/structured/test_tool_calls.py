"""Tool-call parsing per format, whole and streamed at every split point; malformed calls stay content."""

from __future__ import annotations

import json

import pytest

from jaxllm.structured.tool_calls import ToolCallStream, format_for, parse

WEATHER = {"city": "Paris", "unit": "celsius"}
CASES = {
    "hermes": (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        "Let me check.",
    ),
    "llama3": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
        "",
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {}}]',
        "",
    ),
    "json": (
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"function": {"name": "get_time", "arguments": "{}"}}]}',
        "",
    ),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_parses_its_calls(fmt):
    text, content = CASES[fmt]
    got, calls = parse(text, fmt)
    assert got == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", WEATHER), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


def test_newer_mistral_calls():
    content, calls = parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', "mistral")
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", WEATHER)]


@pytest.mark.parametrize(
    "fmt, text",
    [
        ("hermes", 'Sure <tool_call>{"name": "f", "arguments": {"a": }</tool_call>'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}'),  # never closed
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        ("llama3", '{"name": "f", "parameters": {"a": 1}'),
        ("mistral", "[TOOL_CALLS][{oops}]"),
        ("json", '{"answer": 42}'),
        ("json", "Paris is the capital."),
    ],
)
def test_malformed_calls_stay_plain_content(fmt, text):
    assert parse(text, fmt) == (text, [])


def _streamed(text, fmt, split):
    s = ToolCallStream(fmt)
    shown = "".join(s.feed(text[i : i + split]) for i in range(0, len(text), split))
    rest, calls = s.finish()
    return shown + rest, calls


@pytest.mark.parametrize("fmt", list(CASES))
@pytest.mark.parametrize("split", [1, 2, 3, 5, 7])
def test_streamed_calls_equal_the_whole_parse_at_every_split(fmt, split):
    text, content = CASES[fmt]
    shown, calls = _streamed(text, fmt, split)
    want_content, want_calls = parse(text, fmt)
    assert shown.strip() == want_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want_calls]


@pytest.mark.parametrize("fmt", list(CASES))
def test_plain_answers_stream_as_they_come(fmt):
    text = "The weather in Paris is mild < 20 degrees [today]."
    s = ToolCallStream(fmt)
    pieces = [s.feed(ch) for ch in text]
    assert "".join(pieces) + s.finish()[0] == text
    assert sum(map(len, pieces[: len(text) // 2])) > 0  # content is not held to the end


def test_the_stream_holds_only_what_may_start_a_marker():
    s = ToolCallStream("hermes")
    assert s.feed("Hi <tool") == "Hi "
    assert s.feed("box>") == "<toolbox>"


def test_format_follows_the_chat_template():
    assert format_for("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert format_for("[TOOL_CALLS]") == "mistral"
    assert format_for("<|python_tag|>") == "llama3"
    assert format_for(None) == "json"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
CALLS_TEXT = {  # two calls, as each format writes them
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
    '{"name": "get_time", "parameters": {}}',
    "mistral": CASES["mistral"][0],
    "json": '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
    '{"name": "get_time", "arguments": {}}]',
}


@pytest.fixture(scope="module")
def compiler(smollm2_path):
    from jaxllm.loading.gguf_file import GGUFFile
    from jaxllm.structured import GrammarCompiler
    from jaxllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_path).metadata)
    return GrammarCompiler(tok, tok.vocab_size, (tok.eos_id,))


def _matches(compiler, grammar: str, text: str) -> bool:
    from jaxllm.structured import GrammarSpec

    m = compiler.matcher(GrammarSpec.of("grammar", grammar))
    return all(m.accept(t) for t in compiler.tokenizer.encode(text, add_special_tokens=False)) and m.accepting


@pytest.mark.parametrize("fmt", list(CALLS_TEXT))
def test_required_calls_are_what_the_grammar_allows(compiler, fmt):
    from jaxllm.structured.tool_choice import call_grammar, chosen

    text = CALLS_TEXT[fmt]
    assert [c.name for c in parse(text, fmt)[1]] == ["get_weather", "get_time"]
    assert _matches(compiler, call_grammar(fmt, chosen("required", TOOLS), parallel=True), text)
    assert not _matches(compiler, call_grammar(fmt, chosen("required", TOOLS), parallel=False), text)
    named = chosen({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    assert not _matches(compiler, call_grammar(fmt, named, parallel=True), text)  # get_weather is not allowed
    bad_args = text.replace('"celsius"', '"kelvin"')
    assert not _matches(compiler, call_grammar(fmt, chosen("required", TOOLS), parallel=True), bad_args)


@pytest.mark.parametrize("fmt", list(CALLS_TEXT))
def test_forced_parallel_calls_are_bounded_and_a_named_function_is_called_once(compiler, fmt):
    from jaxllm.sampling_params import SamplingParams
    from jaxllm.structured.tool_choice import MAX_PARALLEL_CALLS, call_grammar, chosen, forced

    grammar = call_grammar(fmt, chosen({"type": "function", "function": {"name": "get_time"}}, TOOLS), parallel=True)
    call = {"hermes": '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'}.get(
        fmt, '{"name": "get_time", "' + ("parameters" if fmt == "llama3" else "arguments") + '": {}}'
    )
    sep = {"hermes": "\n", "llama3": "; "}.get(fmt, ", ")

    def written(n):
        calls = sep.join([call] * n)
        return {"mistral": f"[TOOL_CALLS][{calls}]", "json": f"[{calls}]"}.get(fmt, calls)

    assert _matches(compiler, grammar, written(MAX_PARALLEL_CALLS))
    assert not _matches(compiler, grammar, written(MAX_PARALLEL_CALLS + 1))
    named = forced(SamplingParams(), fmt, {"type": "function", "function": {"name": "get_time"}}, TOOLS, True)
    assert _matches(compiler, named.grammar, written(1)) and not _matches(compiler, named.grammar, written(2))
    required = forced(SamplingParams(), fmt, "required", TOOLS, True)
    assert _matches(compiler, required.grammar, written(2))


def test_tool_choice_mistakes_are_clear():
    from jaxllm.errors import InvalidRequestError
    from jaxllm.structured.tool_choice import chosen

    assert chosen("auto", TOOLS) is None and chosen("none", TOOLS) is None
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        chosen({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(InvalidRequestError, match="needs tools"):
        chosen("required", [])
    with pytest.raises(InvalidRequestError, match=r"tools\[0\]"):
        chosen("required", [{"type": "function"}])


def test_forced_choices_set_the_grammar_and_refuse_another_output_format():
    from jaxllm import SamplingParams
    from jaxllm.errors import InvalidRequestError
    from jaxllm.structured.tool_choice import call_grammar, chosen, forced

    free = SamplingParams(max_tokens=8)
    assert forced(free, "json", "auto", TOOLS, True) is free and forced(free, "json", "none", TOOLS, True) is free
    assert forced(free, "json", "required", TOOLS, False).grammar == call_grammar(
        "json", chosen("required", TOOLS), False
    )
    with pytest.raises(InvalidRequestError, match="cannot be combined with an output format"):
        forced(SamplingParams(regex="a+"), "json", "required", TOOLS, True)
