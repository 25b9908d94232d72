"""Structured output through the server with the openai client: response_format json_schema / json_object and
the structured_outputs extension (regex, choice, grammar), streamed and not; bad constraints are 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0},
        "size": {"enum": ["small", "medium", "large"]},
        "districts": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["city", "population", "size", "districts"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def _ask(client, content, stream=False, **kw):
    messages = [{"role": "user", "content": content}]
    if not stream:
        return client.chat.completions.create(model="smollm2", messages=messages, **kw).choices[0].message.content
    parts = client.chat.completions.create(model="smollm2", messages=messages, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for seed, prompt in enumerate(["Describe Paris.", "Tell me about a town you like."]):
        text = _ask(client, prompt, stream, response_format=fmt, max_tokens=160, temperature=0.7, seed=seed)
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow
def test_json_object_and_the_structured_outputs_extension(client):
    text = _ask(client, "Give me JSON.", response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    assert isinstance(json.loads(text), dict)
    text = _ask(client, "A date?", extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]"}}, max_tokens=12)
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]", text), text
    text = _ask(client, "Pick one.", extra_body={"structured_outputs": {"choice": ["left", "right"]}}, max_tokens=8)
    assert text in ("left", "right")
    lark = 'start: "I say " WORD "."\nWORD: /[a-z]+/'
    text = _ask(client, "Say a word.", extra_body={"structured_outputs": {"grammar": lark}}, max_tokens=16)
    assert re.fullmatch(r"I say [a-z]+\.", text), text


def test_a_grammar_the_tokens_cannot_complete_ends_with_length(client):
    messages = [{"role": "user", "content": "Write."}]
    body = {"structured_outputs": {"regex": "[a-z]{300}"}}
    out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, extra_body=body)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert re.fullmatch("[a-z]+", out.choices[0].message.content)


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(extra_body={"structured_outputs": {"regex": "(open"}}), "regex"),
        (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "exactly one"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema.schema"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}), "schema"),
        (dict(response_format={"type": "xml"}), "response_format"),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(client, kw, word):
    with pytest.raises(openai.BadRequestError, match=word):
        _ask(client, "x", max_tokens=4, **kw)
