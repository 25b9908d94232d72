"""A real MCP server (the `mcp` SDK's MCPServer) for the tests: `python mcp_test_server.py` serves it over
stdio; `... http PORT` over streamable HTTP, `... sse PORT` over SSE, `... ws PORT` over WebSocket (at /ws).
Its tools: add, echo, hang (never returns), die (the server process exits mid-call), fail (the tool reports an
error)."""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("jaxllm-test")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
def echo(text: str) -> str:
    """Say the text back."""
    return f"echo: {text}"


@server.tool()
def hang() -> str:
    """Never returns."""
    time.sleep(3600)
    return "late"


@server.tool()
def die() -> str:
    """The server process exits while this call runs."""
    os._exit(3)


@server.tool()
def fail() -> str:
    """The tool fails."""
    raise ValueError("the tool could not do it")


def serve_websocket(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from jaxllm.tools.mcp_websocket import websocket_server

    async def endpoint(websocket):
        await websocket_server(websocket, server)

    uvicorn.run(Starlette(routes=[WebSocketRoute("/ws", endpoint)]), host="127.0.0.1", port=port, log_level="error")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        server.run()
    elif sys.argv[1] == "ws":
        serve_websocket(int(sys.argv[2]))
    else:
        transport = {"http": "streamable-http", "sse": "sse"}[sys.argv[1]]
        server.run(transport, host="127.0.0.1", port=int(sys.argv[2]))
