"""Server-sent events in OpenAI's format: `data: {json}\n\n` lines ending with `data: [DONE]`."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
