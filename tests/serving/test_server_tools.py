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
        loaded=smollm2.loaded, max_num_seqs=4, max_model_len=1024, tools=[SECRET, *agent], max_tool_rounds=1, mcp=mcp
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


def test_streamed_the_answer_comes_after_the_rounds(client):
    chunks = list(_ask(client, tool_choice=FORCE, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "PAPAYA" in text and chunks[-1].choices[0].finish_reason == "stop"


def test_the_clients_own_tools_stay_the_clients(client):
    force = {"type": "function", "function": {"name": "book_table"}}
    reply = _ask(client, tools=[CLIENT_TOOL], tool_choice=force, extra_body={"include_tool_calls": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "book_table"
    assert choice.message.model_extra["tool_steps"] == []


def test_rounds_are_bounded(client):
    """--max-tool-rounds 1: after one round of calls the model's next text is the answer, whatever it says."""
    reply = _ask(client, tool_choice=FORCE, extra_body={"include_tool_calls": True})
    assert len(reply.choices[0].message.model_extra["tool_steps"]) == 1
    assert reply.choices[0].finish_reason in ("stop", "length")


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
    flags = ["--no-warmup", "--max-seqs", "2", "--enable-agent-tools", "--agent-sandbox-root", str(root)]
    with open(log, "w") as err:
        proc, url = spawn_server([*flags, "--mcp-config", str(config)], timeout=600, stderr=err)
    try:
        listed = {t["name"]: t["source"] for t in httpx.get(url + "/v1/tools").json()["data"]}
        assert listed["calc_add"] == "mcp:calc" and listed["read_file"] == "agent" and listed["shell"] == "agent"
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert "tools from agent: read_file, list_dir" in text and "tools from mcp:calc: calc_add" in text
