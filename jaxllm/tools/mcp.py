"""MCP servers' tools, registered as server tools: a client on the official `mcp` SDK (2.x).

Servers come from a JSON file (`--mcp-config`, or `McpConfig` in Python):

    {"servers": [{"id": "files", "source": {"type": "process", "command": "python", "args": ["srv.py"]},
                  "tool_prefix": "files", "enabled": true, "timeout": 30, "retries": 1}]}

A source is a `process` (command, args, env: spoken to over stdio), `http` (streamable HTTP), `sse` or
`websocket` (no longer in the SDK, which dropped it as outside the MCP specification: `mcp_websocket.py`), each
with a `url` and an optional `bearer_token`. Tools are discovered when the hub starts and registered as
`prefix_name` (the prefix defaults to the id).

Each server's session lives in a task of its own on the hub's event loop thread. A call that fails for the
connection (the server died, the network dropped) gives the model an error result and drops the session;
the next call connects again. A call past `timeout` gives an error result too; a failure is retried
`retries` times, reconnecting in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxllm.errors import InvalidRequestError, JaxLLMError
from jaxllm.tools.registry import NAME, Tool

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 30.0


class McpToolError(JaxLLMError):
    """An MCP call failed; the message goes back to the model as the tool's result."""


class McpSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["process", "http", "sse", "websocket"]
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    url: str | None = None
    bearer_token: str | None = None


class McpServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    source: McpSource
    tool_prefix: str | None = None
    enabled: bool = True
    timeout: float = Field(default=30.0, gt=0)
    retries: int = Field(default=1, ge=0)

    @property
    def prefix(self) -> str:
        return self.tool_prefix if self.tool_prefix is not None else self.id


class McpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    servers: list[McpServerConfig]


def load_config(path: str | Path) -> McpConfig:
    """The MCP configuration in a JSON file; a mistake is an `InvalidRequestError` naming the field."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidRequestError(f"cannot read the MCP configuration {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    return parse_config(data, str(path))


def parse_config(data: Any, where: str = "the MCP configuration") -> McpConfig:
    try:
        config = McpConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"{where}: {field}: {err['msg']}") from None
    for s in config.servers:
        need = "command" if s.source.type == "process" else "url"
        if getattr(s.source, need) is None:
            raise InvalidRequestError(f"{where}: server {s.id!r}: a {s.source.type} source needs '{need}'")
    ids = [s.id for s in config.servers]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"{where}: server ids must differ, got {ids}")
    return config


def _transport(source: McpSource):
    """The SDK transport of a source (a fresh one per connection)."""
    headers = {"Authorization": f"Bearer {source.bearer_token}"} if source.bearer_token else None
    if source.type == "process":
        from mcp.client.stdio import StdioServerParameters, stdio_client

        return stdio_client(StdioServerParameters(command=source.command, args=source.args, env=source.env))
    if source.type == "sse":
        from mcp.client.sse import sse_client

        return sse_client(source.url, headers=headers)
    if source.type == "websocket":
        from jaxllm.tools.mcp_websocket import websocket_client

        return websocket_client(source.url, headers)
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
    return streamable_http_client(source.url, http_client=client)


class _Connection:
    """One server's session, owned by a task on the hub's loop (the SDK's contexts must be left in the task that
    entered them): `session()` connects when there is none, `drop()` ends it."""

    def __init__(self, config: McpServerConfig):
        self.config = config
        self.client = None
        self._ready: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None

    async def session(self):
        if self.client is not None:
            return self.client
        if self._task is None or self._task.done():
            self._ready, self._done, self._error = asyncio.Event(), asyncio.Event(), None
            self._task = asyncio.create_task(self._own())
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            self.drop()
            raise McpToolError(f"could not connect within {CONNECT_TIMEOUT:g} s") from None
        if self.client is None:
            raise McpToolError(f"could not connect: {_describe(self._error)}")
        return self.client

    async def _own(self):
        from mcp import Client

        try:
            async with Client(_transport(self.config.source)) as client:
                self.client = client
                self._ready.set()
                await self._done.wait()
        except BaseException as e:  # the connection failed or broke: the next call connects again
            self._error = e
            if not isinstance(e, Exception):
                raise
        finally:
            self.client = None
            self._ready.set()

    def drop(self) -> None:
        self.client = None
        if self._done is not None:
            self._done.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()


def _describe(e: BaseException | None) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if e is not None and str(e) else type(e).__name__


def _text(result) -> str:
    """A call result as the model reads it: its text contents, else its structured content, else a summary."""
    parts = []
    for block in result.content or []:
        text = getattr(block, "text", None)
        parts.append(text if text is not None else f"[{getattr(block, 'type', 'content')} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    return "\n".join(parts)


class McpHub:
    """The MCP servers of one configuration, on an event loop thread of their own. `start()` connects to each
    enabled server and returns their tools (as registry `Tool`s); `close()` ends every session."""

    def __init__(self, config: McpConfig):
        self.config = config
        self.connections = {s.id: _Connection(s) for s in config.servers if s.enabled}
        self.failures: dict[str, str] = {}  # servers whose tools could not be listed at start, and why
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jaxllm-mcp", daemon=True)
        self._thread.start()

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> list[Tool]:
        tools = []
        for server_id, conn in self.connections.items():
            try:
                listed = self._run(self._list(conn), CONNECT_TIMEOUT + conn.config.timeout)
            except Exception as e:
                self.failures[server_id] = _describe(e)
                log.error("MCP server %r: its tools could not be listed (%s); none registered", server_id, _describe(e))
                continue
            for t in listed:
                name = f"{conn.config.prefix}_{t.name}" if conn.config.prefix else t.name
                if not NAME.match(name):
                    log.warning("MCP server %r: tool %r skipped: %r is not a usable tool name", server_id, t.name, name)
                    continue
                tools.append(self._tool(conn, name, t))
        return tools

    def _tool(self, conn: _Connection, name: str, listed) -> Tool:
        c = conn.config
        schema = listed.input_schema or {"type": "object"}
        description = listed.description or f"{listed.name} (MCP server {c.id})"
        budget = (c.timeout + CONNECT_TIMEOUT) * (c.retries + 1)

        def call(**arguments):
            return self.call(c.id, listed.name, arguments)

        return Tool(name, description, schema, call, source=f"mcp:{c.id}", timeout=budget)

    async def _list(self, conn: _Connection):
        client = await conn.session()
        result = await asyncio.wait_for(client.list_tools(), conn.config.timeout)
        return result.tools

    def call(self, server_id: str, tool: str, arguments: dict) -> str:
        """Call `tool` on the server; its text, or `McpToolError` saying what went wrong."""
        conn = self.connections[server_id]
        return self._run(self._call(conn, tool, arguments), (conn.config.timeout + CONNECT_TIMEOUT + 5) * 4)

    async def _call(self, conn: _Connection, tool: str, arguments: dict) -> str:
        c, error = conn.config, None
        for _ in range(c.retries + 1):
            try:
                client = await conn.session()
                result = await asyncio.wait_for(client.call_tool(tool, arguments), c.timeout)
            except TimeoutError:
                raise McpToolError(f"{tool} on MCP server {c.id!r} did not answer within {c.timeout:g} s") from None
            except Exception as e:  # the connection failed: drop it, and retry on a new one
                conn.drop()
                error = e
                continue
            if result.is_error:
                raise McpToolError(_text(result) or f"{tool} failed on MCP server {c.id!r}")
            return _text(result)
        raise McpToolError(f"MCP server {c.id!r} failed ({_describe(error)}); it will be reconnected on the next call")

    def close(self) -> None:
        async def drop_all():
            for conn in self.connections.values():
                conn.drop()
            await asyncio.sleep(0.1)

        with contextlib.suppress(Exception):
            self._run(drop_all(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
