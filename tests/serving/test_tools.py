"""OpenAI tool calling through the server with the real SmolLM2 (its template has no call format of its own:
calls are a JSON list): tool_choice 'required' and a named function return valid tool_calls, streamed and not;
a tool's result sent back yields a final answer; 'auto' returns plain content when the model writes no call."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The current time", "parameters": {}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def _check_calls(calls, names):
    assert calls and all(c.type == "function" and c.id for c in calls)
    for c in calls:
        assert c.function.name in names
        if c.function.name == "get_weather":
            jsonschema.validate(json.loads(c.function.arguments), WEATHER)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid_and_a_result_sent_back_gets_an_answer(client, choice):
    names = {"get_weather", "get_time"} if choice == "required" else {"get_weather"}
    r = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    _check_calls(msg.tool_calls, names)
    call = msg.tool_calls[0]
    followup = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    answer = client.chat.completions.create(model="smollm2", messages=followup, tools=TOOLS, max_tokens=40)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.slow
def test_forced_calls_stream_as_tool_call_deltas(client):
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=80,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _check_calls(deltas, {"get_weather", "get_time"})
    assert [d.index for d in deltas] == list(range(len(deltas)))


def test_tool_choice_mistakes_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=4,
        )
    with pytest.raises(openai.BadRequestError, match="output format"):
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            response_format={"type": "json_object"},
            max_tokens=4,
        )
