"""The Responses API through a running server with the openai client and the real SmolLM2: text, streamed
events, previous_response_id, function tools, text.format, stored responses (kept across a restart)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from jaxllm import LLM
from jaxllm.serving import create_app
from tests.serving.conftest import RunningServer

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    llm = LLM(loaded=smollm2.loaded, max_num_seqs=4, max_model_len=1024)
    db = tmp_path_factory.mktemp("responses") / "responses.sqlite"
    with RunningServer(create_app(llm, served_model_name="smollm2", warmup=False, responses_db=str(db))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _create(client, **kw):
    return client.responses.create(model="smollm2", temperature=0, max_output_tokens=24, **kw)


def test_a_response_streamed_and_not_gives_the_same_text(client):
    reply = _create(client, input="Name three colours.", instructions="Answer briefly.")
    assert reply.object == "response" and reply.output_text and reply.output[0].type == "message"
    used = reply.usage
    assert used.input_tokens > 10 and 0 < used.output_tokens == used.total_tokens - used.input_tokens
    events = list(_create(client, input="Name three colours.", instructions="Answer briefly.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        reply.status and f"response.{reply.status}",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == reply.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_previous_response_id_carries_the_conversation(client):
    first = _create(client, input="My favourite fruit is the mango. Say OK.")
    second = _create(client, input="What is my favourite fruit?", previous_response_id=first.id)
    spelled_out = _create(
        client,
        input=[
            {"role": "user", "content": "My favourite fruit is the mango. Say OK."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my favourite fruit?"},
        ],
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == spelled_out.usage.input_tokens > first.usage.input_tokens
    assert second.output_text == spelled_out.output_text


def test_function_tools_round_trip_through_function_call_items(client):
    call = _create(client, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required")
    (item,) = [o for o in call.output if o.type == "function_call"]
    assert item.name == "get_weather" and isinstance(json.loads(item.arguments), dict) and item.call_id
    result = {"type": "function_call_output", "call_id": item.call_id, "output": "Sunny, 24 C."}
    answer = _create(client, input=[result], previous_response_id=call.id, tools=[WEATHER])
    assert answer.output_text and answer.status in ("completed", "incomplete")
    streamed = list(
        _create(client, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required", stream=True)
    )
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == item.arguments and streamed[-1].response.output[-1].call_id


def test_text_format_json_schema_is_followed(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "capital": {"type": "boolean"}},
        "required": ["city", "capital"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}
    reply = client.responses.create(
        model="smollm2", input="Describe Paris as JSON.", text=fmt, temperature=0, max_output_tokens=60
    )
    assert reply.status == "completed" and reply.text.format.type == "json_schema"
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_max_output_tokens_cuts_the_response_short_as_incomplete(client):
    reply = client.responses.create(model="smollm2", input="Count from one to fifty.", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3


def test_stored_responses_are_got_and_deleted(client, server):
    reply = _create(client, input="Say hello.")
    assert client.responses.retrieve(reply.id).output_text == reply.output_text
    kept = _create(client, input="Say hello.", store=False)
    assert httpx.get(f"{server.url}/v1/responses/{kept.id}").status_code == 404
    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with pytest.raises(openai.NotFoundError, match="no stored response"):
        _create(client, input="Again.", previous_response_id=reply.id)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "banana"}]}, "input.0"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
    ],
)
def test_malformed_requests_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": "smollm2", **body})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param)


def test_a_stored_response_survives_a_restart(tmp_path):
    from jaxllm.serving.launch import spawn_server

    db = str(tmp_path / "responses.sqlite")
    ids = []
    for _ in range(2):
        proc, url = spawn_server(["--no-warmup", "--max-seqs", "2", "--responses-db", db], timeout=600)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            model = client.models.list().data[0].id
            if not ids:
                ids.append(client.responses.create(model=model, input="Say hi.", max_output_tokens=8).id)
            else:
                kept = client.responses.retrieve(ids[0])
                more = client.responses.create(
                    model=model, input="Again.", previous_response_id=ids[0], max_output_tokens=4
                )
                assert kept.id == ids[0] and kept.output_text and more.previous_response_id == ids[0]
        finally:
            proc.terminate()
            proc.wait(60)
