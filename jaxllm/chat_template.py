"""Render Hugging Face chat templates with Jinja2 in a sandbox."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.errors import TokenizerError

VALID_ROLES = ("system", "user", "assistant", "tool", "developer")


class _TemplateRaised(Exception):
    pass


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template has a syntax error on line {e.lineno}: {e.message}") from e


def validate_messages(messages) -> list[dict]:
    """Check the shape of a chat: a non-empty list of {'role', 'content'} dicts."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TokenizerError(f"message {i} must be an object with a 'role' (and usually 'content')")
        if m["role"] not in VALID_ROLES:
            raise TokenizerError(f"message {i} has role {m['role']!r}; expected one of {', '.join(VALID_ROLES)}")
    return messages


def render_chat(
    template: str | None,
    messages,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "",
    eos_token: str | None = "",
    tools=None,
    **extra,
) -> str:
    """Render `messages` with `template`, passing the variables Hugging Face templates expect."""
    if not template:
        raise TokenizerError("this model has no chat template: pass one with --chat-template FILE or use generate")
    validate_messages(messages)
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=tools,
            **extra,
        )
    except _TemplateRaised as e:
        raise TokenizerError(f"the chat template refused these messages: {e}") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template failed to render: {e}") from None


def read_template_file(path: str | Path) -> str:
    """Read a chat template from a .jinja file (or a tokenizer_config-style JSON with 'chat_template')."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TokenizerError(f"cannot read the chat template {p}: {e.strerror}") from None
    if p.suffix == ".json":
        try:
            return json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError):
            raise TokenizerError(f"{p} has no 'chat_template' field") from None
    return text
