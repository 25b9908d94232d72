"""The MCP client against a real MCP server written with the `mcp` SDK (tests/tools/mcp_test_server.py), over
stdio, streamable HTTP, SSE and WebSocket: tools discovered with their prefix, calls, a server dying mid-session
(an error result, then a new connection), a hanging tool timing out, a tool's own failure, and configuration
mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm.errors import InvalidRequestError
from jaxllm.serving.launch import free_port
from jaxllm.tools import ToolRegistry
from jaxllm.tools.mcp import McpHub, load_config, parse_config

SERVER = str(Path(__file__).with_name("mcp_test_server.py"))


def _hub(source: dict, **extra):
    config = parse_config({"servers": [{"id": "test", "source": source, "tool_prefix": "t", "timeout": 5, **extra}]})
    hub = McpHub(config)
    registry = ToolRegistry()
    for tool in hub.start():
        registry.register(tool)
    return hub, registry


def _wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture
def stdio():
    hub, registry = _hub({"type": "process", "command": sys.executable, "args": [SERVER]})
    yield registry
    hub.close()


class NetworkServer:
    """The test server over `transport` ('http', 'sse' or 'ws') in a process of its own, on a fixed port."""

    def __init__(self, transport: str):
        self.transport, self.port, self.proc = transport, free_port(), None

    def start(self):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, self.transport, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        _wait_for_port(self.port)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


URLS = {"http": "http://127.0.0.1:{}/mcp", "sse": "http://127.0.0.1:{}/sse", "ws": "ws://127.0.0.1:{}/ws"}


@pytest.fixture(params=["http", "sse", "ws"])
def network(request):
    server = NetworkServer(request.param)
    server.start()
    kind = {"http": "http", "sse": "sse", "ws": "websocket"}[request.param]
    hub, registry = _hub({"type": kind, "url": URLS[request.param].format(server.port), "bearer_token": "tok"})
    yield registry, server
    hub.close()
    server.kill()


def _names(registry):
    return sorted(registry.tools)


def test_stdio_tools_are_discovered_with_their_prefix_and_called(stdio):
    assert _names(stdio) == ["t_add", "t_die", "t_echo", "t_fail", "t_hang"]
    assert stdio.tools["t_add"].source == "mcp:test" and stdio.tools["t_add"].parameters["required"] == ["a", "b"]
    assert stdio.call("t_add", {"a": 2, "b": 3}).content == "5"
    assert stdio.call("t_echo", {"text": "hi"}).content == "echo: hi"


def test_stdio_a_dying_server_gives_an_error_and_then_reconnects(stdio):
    result = stdio.call("t_die", {})
    assert result.error and "reconnected on the next call" in result.content
    assert stdio.call("t_add", {"a": 1, "b": 1}).content == "2"  # a new server process


def test_stdio_a_hanging_tool_times_out_and_the_server_still_answers(stdio):
    start = time.monotonic()
    result = stdio.call("t_hang", {})
    assert result.error and "did not answer within 5 s" in result.content and time.monotonic() - start < 15
    assert stdio.call("t_echo", {"text": "still here"}).content == "echo: still here"


def test_a_tools_own_failure_is_its_error(stdio):
    result = stdio.call("t_fail", {})
    assert result.error and "fail" in result.content


def test_network_tools_are_discovered_and_called(network):
    registry, _ = network
    assert _names(registry) == ["t_add", "t_die", "t_echo", "t_fail", "t_hang"]
    assert registry.call("t_add", {"a": 20, "b": 22}).content == "42"


def test_network_a_server_killed_mid_session_gives_an_error_then_reconnects(network):
    registry, server = network
    assert registry.call("t_add", {"a": 1, "b": 2}).content == "3"
    server.kill()
    result = registry.call("t_add", {"a": 1, "b": 2})
    assert result.error and "reconnected on the next call" in result.content
    server.start()  # back on the same port
    assert registry.call("t_add", {"a": 2, "b": 2}).content == "4"


def test_a_server_that_cannot_start_registers_nothing_and_says_why():
    config = parse_config({"servers": [{"id": "gone", "source": {"type": "process", "command": "/no/such/cmd"}}]})
    hub = McpHub(config)
    try:
        assert hub.start() == [] and "gone" in hub.failures
    finally:
        hub.close()


@pytest.mark.parametrize(
    "data, words",
    [
        ({"servers": [{"id": "a", "source": {"type": "process"}}]}, ["'command'"]),
        ({"servers": [{"id": "a", "source": {"type": "http"}}]}, ["'url'"]),
        ({"servers": [{"id": "a", "source": {"type": "ftp", "url": "x"}}]}, ["servers.0.source.type"]),
        ({"servers": [{"id": "a", "source": {"type": "sse", "url": "x"}, "timeout": 0}]}, ["timeout"]),
        ({"servers": [{"id": "a", "source": {"type": "sse", "url": "x"}, "colour": 1}]}, ["colour"]),
        ({"servers": [{"id": "a", "source": {"type": "sse", "url": "x"}}] * 2}, ["ids must differ"]),
    ],
)
def test_configuration_mistakes_are_named(data, words):
    with pytest.raises(InvalidRequestError) as e:
        parse_config(data)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_config_file_that_is_not_json(tmp_path):
    bad = tmp_path / "mcp.json"
    bad.write_text("{servers: ")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        load_config(bad)
