"""Tools the server runs itself: the registry, the agent's sandboxed file and shell tools, MCP servers."""

from jaxllm.tools.registry import Tool, ToolRegistry, ToolResult

__all__ = ["Tool", "ToolRegistry", "ToolResult"]
