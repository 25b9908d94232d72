"""The server-side tool loop with no model: which outputs lead to another round, what the conversation gains,
and the bound on rounds."""

from __future__ import annotations

import json

from jaxllm.structured.tool_calls import ToolCall
from jaxllm.tools import Tool, ToolRegistry
from jaxllm.tools.loop import ToolLoop

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLIENT_TOOL = {"type": "function", "function": {"name": "book_trip", "parameters": {"type": "object"}}}


def registry():
    reg = ToolRegistry()
    reg.register(Tool("weather", "The weather in a city.", SCHEMA, lambda city: f"sunny in {city}"))
    return reg


def test_a_server_call_runs_and_its_result_joins_the_conversation():
    loop = ToolLoop(registry(), [{"role": "user", "content": "Weather in Oslo?"}], tool_choice="required")
    assert [t["function"]["name"] for t in loop.tools] == ["weather"] and loop.tool_choice == "required"
    call = ToolCall("weather", json.dumps({"city": "Oslo"}))
    assert loop.take("", [call]) is True
    assistant, tool = loop.messages[1:]
    assert assistant["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert tool == {"role": "tool", "tool_call_id": call.id, "name": "weather", "content": "sunny in Oslo"}
    assert loop.template_messages()[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert loop.tool_choice == "auto"  # a forced choice holds for the first round only
    assert loop.take("It is sunny in Oslo.", []) is False  # an answer ends the loop
    assert [s.as_dict()["content"] for s in loop.steps] == ["sunny in Oslo"] and loop.steps[0].source == "python"


def test_a_failing_call_gives_the_model_the_error():
    loop = ToolLoop(registry(), [{"role": "user", "content": "?"}])
    assert loop.take("", [ToolCall("weather", '{"town": "Oslo"}')]) is True
    assert loop.steps[0].result.error and "'city' is a required property" in loop.messages[-1]["content"]


def test_calls_of_the_clients_tools_go_back_to_the_client():
    loop = ToolLoop(registry(), [{"role": "user", "content": "?"}], client_tools=[CLIENT_TOOL])
    assert [t["function"]["name"] for t in loop.tools] == ["book_trip", "weather"]
    both = [ToolCall("weather", '{"city": "Oslo"}'), ToolCall("book_trip", "{}")]
    assert loop.take("", both) is False and loop.steps == [] and len(loop.messages) == 1


def test_a_model_that_keeps_calling_is_bounded():
    loop = ToolLoop(registry(), [{"role": "user", "content": "?"}], max_rounds=3)
    rounds = 0
    while loop.parses_calls and loop.take("", [ToolCall("weather", '{"city": "Rome"}')]):
        rounds += 1
    assert rounds == 3 and len(loop.steps) == 3 and not loop.parses_calls
    assert loop.take("", [ToolCall("weather", '{"city": "Rome"}')]) is False  # the last round's text is the answer


def test_tool_choice_none_parses_no_calls():
    loop = ToolLoop(registry(), [{"role": "user", "content": "?"}], tool_choice="none")
    assert not loop.parses_calls and loop.take("", [ToolCall("weather", '{"city": "Oslo"}')]) is False
