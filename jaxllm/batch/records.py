"""The output records of a batch job: ours (`id`, `text`, `choices`, `usage`: what `jaxllm generate --input`
has always written) for our lines, OpenAI's batch output lines for theirs, and error records for lines that
could not run."""

from __future__ import annotations

import dataclasses
import uuid

from jaxllm.batch.lines import BadLine
from jaxllm.outputs import RequestOutput
from jaxllm.serving.errors import CODES, error_body, status_of


def own_record(key, out: RequestOutput) -> dict:
    """Our record of one request's output: its first choice at the top level, every choice in `choices`."""
    choices = []
    for c in out.outputs:
        choice = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "token_ids": c.token_ids}
        if c.logprobs is not None:
            choice["logprobs"] = [dataclasses.asdict(lp) for lp in c.logprobs]
        choices.append(choice)
    u = out.usage
    return {
        "id": key,
        "text": choices[0]["text"],
        "finish_reason": choices[0]["finish_reason"],
        "token_ids": choices[0]["token_ids"],
        "choices": choices,
        "usage": {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        },
    }


def success(custom_id, body: dict) -> dict:
    """An OpenAI batch output line for a request that ran."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def failure(bad: BadLine) -> dict:
    """An OpenAI batch output line for a line that could not run: `error` says why (with the line number,
    also in `error.line`); `response` holds the error body the server would have answered, where it had one."""
    response = None
    if bad.status is not None:
        body = error_body(bad.reason, bad.error_type, bad.param, bad.code)
        response = {"status_code": bad.status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": bad.key if bad.key is not None else bad.lineno,
        "response": response,
        "error": {"code": bad.code, "message": bad.message, "param": bad.param, "line": bad.lineno},
    }


def bad_line(item, e: Exception) -> BadLine:
    """The `BadLine` of a request refused once the model was there (its prompt too long, say): for OpenAI lines
    with the HTTP status and error type the server gives that error."""
    api = hasattr(item, "url")
    status, err_type = status_of(e) if api else (None, "invalid_request_error")
    code = CODES.get(type(e), "invalid_request")
    return BadLine(item.lineno, item.key, code, str(e), status, getattr(e, "param", None), api, err_type)
