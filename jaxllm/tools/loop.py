"""The server-side tool loop: the model calls tools the server runs, reads their results, and answers.

A chat with server tools runs in rounds. Each round renders the conversation (with every tool, the server's and
the client's, in the template) and generates; when the output calls server tools only, the server runs them,
appends the assistant's message with its calls and one `tool` message per result, and starts the next round.
An output with no call, or one calling a tool the client declared (the client runs its own, as with OpenAI),
ends the loop and goes back to the client. After `max_rounds` rounds of calls the last generation is not parsed
for calls any more: its text is the answer, so a model that keeps calling is bounded. A forced `tool_choice`
applies to the first round; the rounds after it are free to answer.
"""

from __future__ import annotations

import dataclasses
import json

from jaxllm.tools.registry import ToolRegistry, ToolResult

DEFAULT_MAX_ROUNDS = 8


@dataclasses.dataclass
class ToolStep:
    """A call the server ran, and what it gave: the model's call (id, name, arguments as JSON text) and the
    result, with where the tool comes from."""

    id: str
    name: str
    arguments: str
    result: ToolResult
    source: str

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "arguments": self.arguments,
            "content": self.result.content,
            "error": self.result.error,
            "source": self.source,
        }


class ToolLoop:
    """One chat's rounds. messages: the conversation so far (it grows by each round's calls and results);
    client_tools: the OpenAI tools the client declared (its own to run); tool_choice: the client's choice for
    the first round."""

    def __init__(
        self,
        registry: ToolRegistry,
        messages: list[dict],
        client_tools: list[dict] | None = None,
        tool_choice=None,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
    ):
        self.registry, self.messages = registry, list(messages)
        self.client_tools = list(client_tools or [])
        self.client_names = {t.get("function", {}).get("name") for t in self.client_tools}
        self.first_choice, self.max_rounds = tool_choice, max_rounds
        self.rounds = 0
        self.steps: list[ToolStep] = []

    @property
    def tools(self) -> list[dict]:
        """Every tool the model may call: the client's, then the server's it does not shadow."""
        server = [t.as_openai() for name, t in self.registry.tools.items() if name not in self.client_names]
        return self.client_tools + server

    @property
    def tool_choice(self):
        """The choice for this round: the client's in the first round, 'auto' after it."""
        return self.first_choice if self.rounds == 0 else "auto"

    @property
    def parses_calls(self) -> bool:
        """Whether this round's output is parsed for calls (not with no tool to call, nor once `max_rounds`
        rounds have run)."""
        return bool(self.tools) and self.rounds < self.max_rounds and self.tool_choice != "none"

    def take(self, text: str, calls: list) -> bool:
        """Given a round's output (its content and parsed calls), run its server calls and record them in the
        conversation; True when another round follows (False: the output goes back to the client)."""
        if not calls or not self.parses_calls:
            return False
        if any(c.name in self.client_names or c.name not in self.registry for c in calls):
            return False  # the client's own (or unknown) tools: the client answers them
        results = [self.registry.call(c.name, c.arguments) for c in calls]
        entries = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
        self.messages.append({"role": "assistant", "content": text or "", "tool_calls": entries})
        for c, r in zip(calls, results, strict=True):
            self.messages.append({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": r.content})
            self.steps.append(ToolStep(c.id, c.name, c.arguments, r, self.registry.tools[c.name].source))
        self.rounds += 1
        return True

    def template_messages(self) -> list[dict]:
        """The conversation as chat templates take it (a call's arguments decoded to an object)."""
        out = []
        for m in self.messages:
            if m.get("tool_calls"):
                calls = [
                    {**c, "function": {**c["function"], "arguments": _decoded(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out


def _decoded(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments
