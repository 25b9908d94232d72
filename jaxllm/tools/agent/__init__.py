"""The agent's tools, confined to one directory: files (`files.py`) and a sandboxed shell (`shell.py`)."""

from __future__ import annotations

import functools

from jaxllm.tools.agent.files import TOOLS
from jaxllm.tools.agent.sandbox import Sandbox, SandboxError
from jaxllm.tools.agent.shell import DEFAULT_TIMEOUT, run_shell, shell_unavailable
from jaxllm.tools.registry import Tool

__all__ = ["Sandbox", "SandboxError", "agent_tools", "shell_unavailable"]

SHELL_SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string", "description": "a /bin/sh command line, run in the sandbox root"}},
    "required": ["command"],
    "additionalProperties": False,
}


def agent_tools(sandbox: Sandbox, shell: bool = True) -> tuple[list[Tool], str | None]:
    """The file tools on `sandbox`, and `shell` when asked for and a sandbox for it can be set up; returns the
    tools and, when shell was asked for but is not offered, why."""
    tools = [
        Tool(name, description, schema, functools.partial(fn, sandbox), source="agent")
        for name, (fn, description, schema, _) in TOOLS.items()
    ]
    why = shell_unavailable() if shell else None
    if shell and why is None:
        run = functools.partial(run_shell, sandbox)
        description = (
            "Run a shell command (/bin/sh) in the sandbox root, with no network and nothing else of the machine "
            f"writable; it is killed after {DEFAULT_TIMEOUT:g} s."
        )
        tools.append(Tool("shell", description, SHELL_SCHEMA, run, source="agent", timeout=DEFAULT_TIMEOUT + 10))
    return tools, why
