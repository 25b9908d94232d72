"""OpenAI's tool_choice as output constraints: `required` and a named function are enforced by a grammar that
only lets the model write calls in its own format, with arguments matching each tool's `parameters`."""

from __future__ import annotations

import dataclasses
import json

from jaxllm.errors import InvalidRequestError
from jaxllm.structured.grammar import JSON_OPTIONS

# Calls a forced choice may write at once: a small model under a grammar can otherwise repeat the same call
# until max_tokens, and the output (an unclosed list) parses as no call at all.
MAX_PARALLEL_CALLS = 8

# Where a format's calls sit: the text before one call (or the whole list) and after it.
WRAP = {
    "hermes": ("<tool_call>\n", "\n</tool_call>"),
    "mistral": ("[TOOL_CALLS]", ""),
    "llama3": ("", ""),
    "json": ("", ""),
}


def functions(tools) -> dict[str, dict]:
    """name -> parameters schema of each function tool (OpenAI's `{"type": "function", "function": {...}}`)."""
    out = {}
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string", param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema", param="tools")
        out[name] = params
    return out


def chosen(tool_choice, tools) -> dict[str, dict] | None:
    """The functions a call must be one of (None: the model may answer in plain text, or tool_choice is
    'none'): every tool for 'required', one for {"type": "function", "function": {"name": ...}}."""
    fns = functions(tools)
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not fns:
            raise InvalidRequestError("tool_choice 'required' needs tools", param="tool_choice")
        return fns
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise InvalidRequestError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in fns:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return {name: fns[name]}


def forced(params, fmt: str, tool_choice, tools, parallel: bool):
    """`params` (SamplingParams) with the grammar that makes the model call what a 'required' or named
    `tool_choice` asks for, in the format `fmt`; as they are for 'auto' and 'none'. A named function is called
    once (as vLLM forces it), 'required' up to `MAX_PARALLEL_CALLS` times with `parallel`: a small model told
    to call one function otherwise repeats the call while the grammar lets it."""
    must = chosen(tool_choice, tools)
    if must is None:
        return params
    if params.structured is not None:
        raise InvalidRequestError("tool_choice cannot be combined with an output format", param="tool_choice")
    return dataclasses.replace(params, grammar=call_grammar(fmt, must, parallel and tool_choice == "required"))


def call_grammar(fmt: str, fns: dict[str, dict], parallel: bool) -> str:
    """A Lark grammar (for `SamplingParams(grammar=...)`) of one call, or with `parallel` one to
    `MAX_PARALLEL_CALLS`, to the functions `fns`, written as the format `fmt` writes them
    (`jaxllm.structured.tool_calls`)."""
    args_key = "parameters" if fmt == "llama3" else "arguments"
    one = {
        "x-guidance": JSON_OPTIONS,
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, args_key: schema},
                "required": ["name", args_key],
                "additionalProperties": False,
            }
            for name, schema in fns.items()
        ],
    }
    if fmt in ("mistral", "json"):  # a list of calls
        listed = {"x-guidance": JSON_OPTIONS, "type": "array", "items": one, "minItems": 1}
        listed["maxItems"] = MAX_PARALLEL_CALLS if parallel else 1
        before, _ = WRAP[fmt]
        return f"start: {json.dumps(before) + ' ' if before else ''}calls\ncalls: %json {json.dumps(listed)}"
    before, after = WRAP[fmt]
    join = '"; "' if fmt == "llama3" else '"\\n"'
    many = ""
    for _ in range(MAX_PARALLEL_CALLS - 1 if parallel else 0):  # up to the bound: nested optional calls
        many = f"({join} call {many})?"
    pieces = " ".join(
        p for p in (json.dumps(before) if before else "", "body", json.dumps(after) if after else "") if p
    )
    return f"start: call {many}\ncall: {pieces}\nbody: %json {json.dumps(one)}"
