"""MCP over WebSocket, for the servers that still speak it: one JSON-RPC message per text frame, subprotocol
"mcp" (as the `mcp` SDK's 1.x transport did; 2.x removed it, WebSocket never being part of the specification).

`websocket_client` is a transport for the SDK's `Client`; `websocket_server` serves an SDK server on a
Starlette WebSocket (the tests use it to run a real MCP server over WebSocket).
"""

from __future__ import annotations

import contextlib

import anyio
from mcp import types
from mcp.shared.message import SessionMessage

SUBPROTOCOL = "mcp"


def _parse(raw: str | bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(raw, by_name=False))
    except ValueError as e:  # handed to the session, which reports it
        return e


def _dump(message: SessionMessage) -> str:
    return message.message.model_dump_json(by_alias=True, exclude_unset=True)


def _pump(tg, receive, send):
    """Start the two tasks that carry messages between a WebSocket (`receive()` -> text, `send(text)`) and the
    session's streams; returns (read stream, write stream). A closed socket ends the read stream, so that the
    session sees the connection end."""
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader():
        async with read_writer:
            with contextlib.suppress(Exception):
                while True:
                    await read_writer.send(_parse(await receive()))

    async def writer():
        async with write_reader:
            with contextlib.suppress(Exception):
                async for message in write_reader:
                    await send(_dump(message))

    tg.start_soon(reader)
    tg.start_soon(writer)
    return read_stream, write_stream


@contextlib.asynccontextmanager
async def websocket_client(url: str, headers: dict | None = None):
    """(read stream, write stream) over a WebSocket connection to `url`; a dropped connection closes the read
    stream, so that the session's pending requests fail."""
    from websockets.asyncio.client import connect

    async with connect(url, subprotocols=[SUBPROTOCOL], additional_headers=headers, open_timeout=30) as ws:
        async with anyio.create_task_group() as tg:
            try:
                yield _pump(tg, ws.recv, ws.send)
            finally:
                tg.cancel_scope.cancel()


async def websocket_server(websocket, server) -> None:
    """Serve the SDK server `server` (an `MCPServer` or low-level `Server`) on a Starlette `websocket` (accepted
    here) until it closes."""
    lowlevel = getattr(server, "_lowlevel_server", server)
    await websocket.accept(subprotocol=SUBPROTOCOL)
    async with anyio.create_task_group() as tg:
        read_stream, write_stream = _pump(tg, websocket.receive_text, websocket.send_text)
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
        tg.cancel_scope.cancel()
