"""Tool calls in model output, per chat-template family, whole or streamed.

Formats:
- "hermes" (Hermes, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number,
  with plain content around them;
- "llama3" (Llama 3.1+): the output is `{"name": ..., "parameters": {...}}` (or "arguments"), optionally
  after `<|python_tag|>`, several joined by ";";
- "mistral": `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}` (v0.3) or, newer,
  `name[ARGS]{...}` per call;
- "json" (templates with no format of their own): the output is a call object, a list of them, or
  `{"tool_calls": [...]}`.

A call whose JSON does not parse, or lacks a name, is not a call: the text stays plain content, never an
error. Streaming (`ToolCallStream`) hands out plain content as it comes, holding back only text that may be
the start of a call, and each call whole once it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

FORMATS = ("hermes", "llama3", "mistral", "json")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"  # the Hermes/Qwen tags


@dataclasses.dataclass
class ToolCall:
    """One call: the function's name and its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def format_for(chat_template: str | None) -> str:
    """The tool-call format a chat template's model writes (see the module docstring)."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "json"


def parse(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(plain content, calls) of a complete output in format `fmt`."""
    if fmt == "hermes":
        return _parse_tagged(text, _OPEN, _CLOSE)
    if fmt == "mistral":
        return _parse_mistral(text)
    body = text.strip()
    if fmt == "llama3" and body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].strip()
    calls = _calls_of_json(body, ";" if fmt == "llama3" else None)
    return ("", calls) if calls else (text, [])


def _call(obj) -> ToolCall | None:
    """A call from a decoded object with a name and arguments (or parameters), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _calls_of_json(body: str, separator: str | None) -> list[ToolCall]:
    """Calls from a body that is one JSON value (an object, a list, {"tool_calls": [...]}) or, with a
    separator, several objects joined by it; [] when it is not entirely calls."""
    pieces = [body]
    try:
        values = [json.loads(body)]
    except json.JSONDecodeError:
        if separator is None:
            return []
        pieces = [p for p in body.split(separator) if p.strip()]
        try:
            values = [json.loads(p) for p in pieces]
        except json.JSONDecodeError:
            return []
    objs = []
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("tool_calls"), list):
            objs += v["tool_calls"]
        elif isinstance(v, list):
            objs += v
        else:
            objs.append(v)
    objs = [o.get("function", o) if isinstance(o, dict) and "function" in o else o for o in objs]
    calls = [_call(o) for o in objs]
    return calls if calls and all(c is not None for c in calls) else []


def _parse_tagged(text: str, open_tag: str, close_tag: str) -> tuple[str, list[ToolCall]]:
    content, calls, rest = [], [], text
    while True:
        start = rest.find(open_tag)
        if start < 0:
            content.append(rest)
            break
        end = rest.find(close_tag, start)
        if end < 0:  # an unclosed call: plain content
            content.append(rest)
            break
        call = _call(_loads(rest[start + len(open_tag) : end]))
        content.append(rest[:start] if call else rest[: end + len(close_tag)])
        if call:
            calls.append(call)
        rest = rest[end + len(close_tag) :]
    return "".join(content).strip() if calls else text, calls


def _parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    marker = "[TOOL_CALLS]"
    at = text.find(marker)
    if at < 0:
        return text, []
    body = text[at + len(marker) :].strip()
    calls = _calls_of_json(body, None)
    if not calls and "[ARGS]" in body:  # name[ARGS]{...} per call, newer templates
        calls = []
        for part in body.split(marker):
            name, sep, args = part.strip().partition("[ARGS]")
            call = _call({"name": name.strip(), "arguments": _loads(args)}) if sep else None
            if call is None:
                return text, []
            calls.append(call)
    return (text[:at].strip(), calls) if calls else (text, [])


def _loads(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


class ToolCallStream:
    """Streaming the same parse: `feed(delta)` returns the plain content that is safe to show now, and
    `take_calls()` the calls complete so far (a tagged call as soon as its closing tag arrives, the content after
    it streaming on); `finish()` gives the rest once the output is complete. Content is held back only from
    where a call may begin: a tag or marker (or a prefix of one at the end of the text so far), or, for the JSON
    formats, an output that begins like JSON. `count`: the calls found so far."""

    def __init__(self, fmt: str):
        self.fmt, self.text, self.shown = fmt, "", 0
        self.count = 0
        self._ready: list[ToolCall] = []

    def feed(self, delta: str) -> str:
        self.text += delta
        out = self._closed_calls() if self.fmt == "hermes" else ""
        safe = self._safe_end()
        out, self.shown = out + self.text[self.shown : safe], max(self.shown, safe)
        return out

    def take_calls(self) -> list[ToolCall]:
        """The calls completed since the last time, in order."""
        calls, self._ready = self._ready, []
        return calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet shown, calls not yet taken) for the complete output."""
        if self.fmt == "hermes":  # an unclosed call is plain content
            rest, self.shown = self.text[self.shown :], len(self.text)
            return rest, self.take_calls()
        content, calls = parse(self.text, self.fmt)
        self.count += len(calls)
        if not calls:
            return self.text[self.shown :], []
        shown = self.text[: self.shown]
        return (content[len(shown) :] if content.startswith(shown) else ""), calls

    def _closed_calls(self) -> str:
        """Move past each tagged call closed since the last time: a valid one is taken out of the content, one
        whose body is not a call stays content. Returns the content before and between them."""
        out = []
        while (at := self.text.find(_OPEN, self.shown)) >= 0 and (end := self.text.find(_CLOSE, at)) >= 0:
            call, after = _call(_loads(self.text[at + len(_OPEN) : end])), end + len(_CLOSE)
            out.append(self.text[self.shown : at] if call else self.text[self.shown : after])
            if call:
                self._ready.append(call)
                self.count += 1
            self.shown = after
        return "".join(out)

    def _safe_end(self) -> int:
        t = self.text
        if self.fmt in ("llama3", "json"):
            head = t.lstrip()
            starts_json = head[:1] in ("{", "[") or "<|python_tag|>".startswith(head[:14]) and head != ""
            return self.shown if starts_json or not head else len(t)
        marker = _OPEN if self.fmt == "hermes" else "[TOOL_CALLS]"
        at = t.find(marker, self.shown)
        if at >= 0:
            return at
        for k in range(min(len(marker) - 1, len(t)), 0, -1):  # a marker may be starting at the end
            if marker.startswith(t[-k:]):
                return max(self.shown, len(t) - k)
        return len(t)
