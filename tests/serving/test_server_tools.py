"""Tools the server runs itself, through a running server with the openai client and the real SmolLM2: a forced
call is run and its result answers the question, streamed or not; the client's own tools stay the client's;
/v1/tools lists what is registered; the rounds are bounded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import openai
import pytest

from jaxllm import LLM
from jaxllm.serving import create_app
from jaxllm.tools import Tool
from jaxllm.tools.agent import Sandbox, agent_tools
from tests.serving.conftest import RunningServer

pytestmark = pytest.mark.slow

SECRET = Tool(
    "get_secret_word",
    "Returns today's secret word.",
    {"type": "object", "properties": {}, "additionalProperties": False},
    lambda: "The secret word is PAPAYA.",
)
REPORT = Tool(
    "get_report",
    "Returns the full report.",
    {"type": "object", "properties": {}, "additionalProperties": False},
    lambda: "lorem ipsum " * 2000,  # far more than the context holds
)
SERVER = str(Path(__file__).parents[1] / "tools" / "mcp_test_server.py")
ASK = [{"role": "user", "content": "What is today's secret word? Use the tool, then tell me the word."}]
FORCE = {"type": "function", "function": {"name": "get_secret_word"}}
CLIENT_TOOL = {
    "type": "function",
    "function": {
        "name": "book_table",
        "description": "Book a table.",
        "parameters": {"type": "object", "properties": {"people": {"type": "integer"}}, "required": ["people"]},
    },
}


@pytest.fixture(scope="module")
def tool_server(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("agent")
    (root / "notes.txt").write_text("remember the milk\n")
    agent, _ = agent_tools(Sandbox(root))
    mcp = {"servers": [{"id": "test", "source": {"type": "process", "command": sys.executable, "args": [SERVER]}}]}
    llm = LLM(
        loaded=smollm2.loaded,
        max_num_seqs=4,
        max_model_len=1024,
        tools=[SECRET, REPORT, *agent],
        max_tool_rounds=1,
        mcp=mcp,
    )
    with RunningServer(create_app(llm, served_model_name="smollm2", warmup=False)) as server:
        yield server
    assert llm.mcp is None  # the app's shutdown closed the MCP sessions


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="none")


def _ask(client, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=60, temperature=0, parallel_tool_calls=False, **kw
    )


def test_a_forced_server_call_is_run_and_its_result_answers(client):
    reply = _ask(client, tool_choice=FORCE, extra_body={"include_tool_calls": True})
    choice = reply.choices[0]
    assert "PAPAYA" in choice.message.content and choice.finish_reason == "stop" and not choice.message.tool_calls
    (step,) = choice.message.model_extra["tool_steps"]
    assert step["name"] == "get_secret_word" and step["content"] == "The secret word is PAPAYA." and not step["error"]
    assert reply.usage.prompt_tokens > 2 * len(ASK[0]["content"].split())  # two rounds of prompt counted


def test_streamed_each_round_streams_live_with_the_steps_between(client):
    chunks = list(_ask(client, tool_choice=FORCE, stream=True, extra_body={"include_tool_calls": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    (at,) = [k for k, d in enumerate(deltas) if (d.model_extra or {}).get("tool_steps")]
    assert deltas[at].model_extra["tool_steps"][0]["content"] == "The secret word is PAPAYA."
    answer = [d.content for d in deltas[at + 1 :] if d.content]
    assert len(answer) > 3 and "PAPAYA" in "".join(answer)  # token by token, not one chunk at the end
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_result_that_floods_the_context_is_a_clear_error_streamed_or_not(client):
    force = {"type": "function", "function": {"name": "get_report"}}
    flooded = "results of 1 tool calls the conversation no longer fits .* 1024-token"
    with pytest.raises(openai.BadRequestError, match=flooded):
        _ask(client, tool_choice=force)
    chunks = []
    with pytest.raises(openai.APIError, match="results of 1 tool calls"):  # the stream had begun: an error event
        for c in _ask(client, tool_choice=force, stream=True):
            chunks.append(c)
    assert chunks and chunks[0].choices[0].delta.role == "assistant"


def test_the_responses_api_lists_the_servers_calls_as_mcp_call_items(client):
    force = {"type": "function", "name": "get_secret_word"}
    kw = {"model": "smollm2", "input": ASK[0]["content"], "tool_choice": force, "max_output_tokens": 60}
    reply = client.responses.create(**kw, temperature=0)
    step, message = reply.output
    assert step.type == "mcp_call" and step.name == "get_secret_word" and step.server_label == "python"
    assert step.output == "The secret word is PAPAYA." and step.error is None and step.status == "completed"
    assert message.type == "message" and "PAPAYA" in reply.output_text
    events = list(client.responses.create(**kw, temperature=0, stream=True))
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["mcp_call", "message"] and events[-1].response.output_text == reply.output_text
    assert [o.type for o in events[-1].response.output] == ["mcp_call", "message"]


def test_the_clients_own_tools_stay_the_clients(client):
    force = {"type": "function", "function": {"name": "book_table"}}
    reply = _ask(client, tools=[CLIENT_TOOL], tool_choice=force, extra_body={"include_tool_calls": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "book_table"
    assert choice.message.model_extra["tool_steps"] == []


def test_a_forced_call_of_an_mcp_tool_runs_on_the_mcp_server(client):
    force = {"type": "function", "function": {"name": "test_echo"}}
    reply = _ask(client, tool_choice=force, extra_body={"include_tool_calls": True})
    (step,) = reply.choices[0].message.model_extra["tool_steps"]
    assert step["source"] == "mcp:test" and step["content"].startswith("echo: ") and not step["error"]


def test_v1_tools_lists_what_the_server_runs(tool_server):
    listed = httpx.get(tool_server.url + "/v1/tools").json()["data"]
    sources = {t["name"]: t["source"] for t in listed}
    assert sources["get_secret_word"] == "python" and sources["read_file"] == sources["shell"] == "agent"
    assert sources["test_add"] == "mcp:test" and sources["test_echo"] == "mcp:test"
    assert {"write_file", "grep", "delete"} <= set(sources)
    assert all(t["parameters"]["type"] == "object" and t["description"] for t in listed)


def test_jaxllm_serve_registers_agent_and_mcp_tools_and_says_so(tmp_path):
    from jaxllm.serving.launch import spawn_server

    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "mcp.json"
    source = {"type": "process", "command": sys.executable, "args": [SERVER]}
    config.write_text(json.dumps({"servers": [{"id": "calc", "source": source, "tool_prefix": "calc"}]}))
    log = tmp_path / "serve.log"
    flags = ["--no-warmup", "--max-seqs", "2", "--max-tool-rounds", "2"]
    flags += ["--enable-agent-tools", "--agent-sandbox-root", str(root)]
    with open(log, "w") as err:
        proc, url = spawn_server([*flags, "--mcp-config", str(config)], timeout=600, stderr=err)
    try:
        listed = {t["name"]: t["source"] for t in httpx.get(url + "/v1/tools").json()["data"]}
        assert listed["calc_add"] == "mcp:calc" and listed["read_file"] == "agent" and listed["shell"] == "agent"
        _a_model_that_keeps_calling_is_bounded(openai.OpenAI(base_url=url + "/v1", api_key="none"))
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert "tools from agent: read_file, list_dir" in text and "tools from mcp:calc: calc_add" in text


def _a_model_that_keeps_calling_is_bounded(client):
    """--max-tool-rounds 2: a model made to write the same call in every round (a one-choice output constraint)
    has its calls run twice; the third output is not parsed for calls, and is the answer as written."""
    call = '{"name": "calc_add", "arguments": {"a": 2, "b": 3}}'
    kw = {
        "model": client.models.list().data[0].id,
        "messages": [{"role": "user", "content": "Add 2 and 3."}],
        "max_tokens": 40,
    }
    extra = {"include_tool_calls": True, "structured_outputs": {"choice": [call]}}
    reply = client.chat.completions.create(**kw, extra_body=extra)
    choice = reply.choices[0]
    assert [s["content"] for s in choice.message.model_extra["tool_steps"]] == ["5", "5"]
    assert choice.message.content == call and not choice.message.tool_calls and choice.finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, extra_body=extra, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert sum(len((d.model_extra or {}).get("tool_steps", [])) for d in deltas) == 2
    assert "".join(d.content or "" for d in deltas).endswith(call) and chunks[-1].choices[0].finish_reason == "stop"
