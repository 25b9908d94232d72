"""Tools the server runs itself: each a name, a description, a JSON schema of its arguments and a callable,
registered from Python, from MCP servers or from the agent's sandbox.

`ToolRegistry.call` never raises: arguments that do not match the schema, a tool that raises, one that runs
past its timeout and one whose result is too long all come back as a `ToolResult` the model can read (an error
says what went wrong). Each call runs on a thread of its own, so a hung tool holds only that thread (Python
cannot stop it: it is abandoned), never the caller's nor another call's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable

import jsonschema

from jaxllm.errors import InvalidRequestError, JaxLLMError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name
DEFAULT_TIMEOUT = 30.0
MAX_RESULT_CHARS = 64 * 1024


@dataclasses.dataclass
class Tool:
    """A callable the model may call: fn(**arguments) -> str (or anything JSON-serializable). source: where it
    comes from ('python', 'agent', 'mcp:<server id>'); timeout: seconds a call may take."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., object]
    source: str = "python"
    timeout: float = DEFAULT_TIMEOUT

    def as_openai(self) -> dict:
        """The tool as an entry of OpenAI's `tools`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclasses.dataclass
class ToolResult:
    """What a call gave: its text, and whether it is an error (the model reads both the same way)."""

    content: str
    error: bool = False


class ToolRegistry:
    """Tools by name; `call` runs one with its timeout and caps its result at `max_result_chars`."""

    def __init__(self, max_result_chars: int = MAX_RESULT_CHARS):
        self.tools: dict[str, Tool] = {}
        self.max_result_chars = max_result_chars

    def register(self, tool: Tool) -> None:
        """Add a tool; a bad name or schema, or a name taken already, is an `InvalidRequestError`."""
        if not NAME.match(tool.name):
            raise InvalidRequestError(
                f"tool name {tool.name!r} must be 1-64 letters, digits, '_' or '-': rename it (or give a prefix)"
            )
        if tool.name in self.tools:
            raise InvalidRequestError(
                f"tool {tool.name!r} is registered already (from {self.tools[tool.name].source}): give one of them "
                "another name or prefix"
            )
        try:
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
        except jsonschema.SchemaError as e:
            raise InvalidRequestError(f"tool {tool.name!r} has an invalid parameters schema: {e.message}") from None
        self.tools[tool.name] = tool

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def describe(self) -> list[dict]:
        """Each tool's name, description, schema and source (what `GET /v1/tools` lists)."""
        return [
            {"name": t.name, "description": t.description, "parameters": t.parameters, "source": t.source}
            for t in self.tools.values()
        ]

    def call(self, name: str, arguments: str | dict) -> ToolResult:
        """Run the tool `name` with `arguments` (a JSON object or its text); errors become error results."""
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(f"there is no tool named {name!r}; the tools are: {', '.join(self.tools)}", True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                return ToolResult(f"the arguments are not valid JSON ({e.msg}): send a JSON object", True)
        if not isinstance(arguments, dict):
            return ToolResult("the arguments must be a JSON object", True)
        error = next(jsonschema.Draft202012Validator(tool.parameters).iter_errors(arguments), None)
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "arguments"
            return ToolResult(f"invalid arguments for {name}: {where}: {error.message}", True)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(tool.fn(**arguments))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        threading.Thread(target=run, name=f"jaxllm-tool-{name}", daemon=True).start()
        try:
            value = future.result(timeout=tool.timeout)
        except concurrent.futures.TimeoutError:
            return ToolResult(f"{name} did not finish within {tool.timeout:g} s: it was abandoned", True)
        except JaxLLMError as e:
            return ToolResult(str(e), True)
        except Exception as e:  # a tool's own failure is the model's to read, never the server's
            log.warning("tool %s failed: %r", name, e)
            return ToolResult(f"{name} failed: {type(e).__name__}: {e}", True)
        return ToolResult(self._capped(value if isinstance(value, str) else json.dumps(value, default=str)))

    def _capped(self, text: str) -> str:
        if len(text) <= self.max_result_chars:
            return text
        return text[: self.max_result_chars] + f"\n... ({len(text) - self.max_result_chars} more characters cut)"
