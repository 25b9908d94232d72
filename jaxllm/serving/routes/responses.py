"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API over the chat machinery.

A response request becomes a chat request (`responses_protocol`) and runs as chat rounds (`ChatRounds`: tools
the server runs are run, the client's come back as `function_call` items). The output is an `mcp_call` item per
call the server ran (its output, or its error), a `message` item with the text and a `function_call` item per
call for the client. With `store` (the default) the response and its conversation
are kept (`ResponseStore`), so that `previous_response_id` continues it and GET returns it. Streamed, the
Responses event types come as server-sent events: created, in_progress, the message's item, part and text
deltas, each call's item and arguments, then completed (or incomplete, when max_output_tokens cut it short).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.serving.errors import NotFoundError
from jaxllm.serving.responses_protocol import ResponsesRequest
from jaxllm.serving.routes.chat_tools import ChatRounds
from jaxllm.serving.routes.common import chained, described, first_and_rest, parse_body, request_id, stream_failure


async def create_response(request: Request):
    state = request.app.state.server
    start = time.monotonic()
    req = await parse_body(request, state, ResponsesRequest)
    history: list[dict] = []
    if req.previous_response_id is not None:
        history = state.responses.messages(req.previous_response_id)
        if history is None:
            raise NotFoundError(
                f"no stored response {req.previous_response_id!r} to continue (it was deleted, never stored, or "
                "stored by a server with another --responses-db)",
                param="previous_response_id",
            )
    try:
        chat = req.as_chat(history)
    except ValidationError as e:
        raise InvalidRequestError(*described(e.errors())) from None
    if chat.n != 1:
        raise InvalidRequestError("n must be 1", "n")
    shape = _Shape(req, request_id("resp"))
    rounds = ChatRounds(state, chat, shape.id, start)
    if req.stream:
        first, rest = await first_and_rest(rounds.generate())  # the first round's errors are the response's
        return StreamingResponse(_events(state, shape, rounds, first, rest), media_type="text/event-stream")
    while True:
        async for _ in rounds.generate():
            pass
        if not await rounds.take():
            break
    out = rounds.out
    body = shape.finished(out.text, out.tool_calls or [], out.finish_reason, rounds.usage, rounds.loop.steps)
    _store(state, req, rounds, body, out.text, out.tool_calls or [])
    state.metrics.requests.labels("200").inc()
    return JSONResponse(body)


async def get_response(request: Request):
    state = request.app.state.server
    body = state.responses.get(request.path_params["response_id"])
    if body is None:
        raise NotFoundError(f"no stored response {request.path_params['response_id']!r}", param="response_id")
    return JSONResponse(body)


async def delete_response(request: Request):
    state = request.app.state.server
    response_id = request.path_params["response_id"]
    if not state.responses.delete(response_id):
        raise NotFoundError(f"no stored response {response_id!r}", param="response_id")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


class _Shape:
    """The response object of one request, as it stands (in progress, then finished)."""

    def __init__(self, req: ResponsesRequest, response_id: str):
        self.req, self.id = req, response_id
        self.created = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex[:24]}"

    def base(self, status: str) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "tool_choice": choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "text": {"format": fmt or {"type": "text"}},
            "store": req.store,
            "metadata": req.metadata or {},
            "truncation": "disabled",
            "user": req.user,
            "usage": None,
        }

    def message(self, text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": [part]}

    @staticmethod
    def call(c, status: str = "completed") -> dict:
        args = c.arguments if status == "completed" else ""
        item = {"type": "function_call", "id": f"fc_{c.id}", "call_id": c.id, "name": c.name, "arguments": args}
        return {**item, "status": status}

    @staticmethod
    def step(s) -> dict:
        """A call the server ran itself (`ToolStep`), as an `mcp_call` item: its output, or its error."""
        failed = s.result.error
        return {
            "type": "mcp_call",
            "id": f"mcp_{s.id}",
            "server_label": s.source,
            "name": s.name,
            "arguments": s.arguments,
            "output": None if failed else s.result.content,
            "error": {"type": "mcp_tool_execution_error", "content": s.result.content} if failed else None,
            "status": "failed" if failed else "completed",
        }

    def finished(self, text: str, calls: list, finish_reason: str | None, used: dict, steps=()) -> dict:
        """The finished response: the server's steps, the message (when there is text, or nothing else), the
        client's calls."""
        cut = finish_reason == "length"
        body = self.base("incomplete" if cut else "completed")
        if cut:
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        body["output"] = [self.step(s) for s in steps]
        body["output"] += [self.message(text, "incomplete" if cut else "completed")] if text or not calls else []
        body["output"] += [self.call(c) for c in calls]
        body["usage"] = {
            "input_tokens": used["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": used["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": used["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used["total_tokens"],
        }
        return body


def _store(state, req: ResponsesRequest, rounds: ChatRounds, body: dict, text: str, calls: list) -> None:
    """Keep a stored response with its conversation: everything but this request's instructions, the server's
    tool rounds included, then the answer."""
    if not req.store:
        return
    messages = rounds.loop.messages[1:] if req.instructions else list(rounds.loop.messages)
    answer: dict = {"role": "assistant", "content": text}
    if calls:
        answer["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    state.responses.put(body, [*messages, answer])


def _sse(kind: str, payload: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _events(state, shape: _Shape, rounds: ChatRounds, first, rest):
    """The Responses stream (see the module docstring); an error once it has begun is an `error` event."""
    numbers = itertools.count()

    def ev(kind: str, **fields) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(numbers), **fields})

    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield ev("response.created", response=shape.base("in_progress"))
    yield ev("response.in_progress", response=shape.base("in_progress"))
    items: list = []  # the output as streamed, in order (None: the message, until it is done)
    text = ""
    deltas = chained(first, rest)

    def where() -> dict:
        return {"item_id": shape.message_id, "output_index": items.index(None), "content_index": 0}

    def open_message():
        items.append(None)
        yield ev("response.output_item.added", output_index=len(items) - 1, item=shape.message("", "in_progress"))
        yield ev("response.content_part.added", **where(), part=empty_part)

    try:
        while True:
            async for delta in deltas:
                if not delta.text:
                    continue
                if None not in items:
                    for e in open_message():
                        yield e
                text += delta.text
                yield ev("response.output_text.delta", **where(), delta=delta.text, logprobs=[])
            ran = len(rounds.loop.steps)
            if not await rounds.take():
                break
            for step in rounds.loop.steps[ran:]:
                items.append(_Shape.step(step))
                yield ev(
                    "response.output_item.added", output_index=len(items) - 1, item={**items[-1], "status": "calling"}
                )
                yield ev("response.output_item.done", output_index=len(items) - 1, item=items[-1])
            deltas = rounds.generate()
        out = rounds.out
        calls = out.tool_calls or []
        body = shape.finished(text, calls, out.finish_reason, rounds.usage)
        if text or not calls:
            if None not in items:
                for e in open_message():
                    yield e
            message = body["output"][0]
            yield ev("response.output_text.done", **where(), text=text, logprobs=[])
            yield ev("response.content_part.done", **where(), part=message["content"][0])
            yield ev("response.output_item.done", output_index=items.index(None), item=message)
            items[items.index(None)] = message
        for c in calls:
            item = _Shape.call(c)
            k = len(items)
            items.append(item)
            at = {"item_id": item["id"], "output_index": k}
            yield ev("response.output_item.added", output_index=k, item=_Shape.call(c, "in_progress"))
            yield ev("response.function_call_arguments.delta", **at, delta=c.arguments)
            yield ev("response.function_call_arguments.done", **at, name=c.name, arguments=c.arguments)
            yield ev("response.output_item.done", output_index=k, item=item)
        body["output"] = items
        _store(state, shape.req, rounds, body, text, calls)
        yield ev(f"response.{body['status']}", response=body)
        state.metrics.requests.labels("200").inc()
    except Exception as e:  # noqa: BLE001 — the stream has begun: the error is one of its events
        message, _, param = stream_failure(state, e, "a streamed response")
        yield ev("error", code=None, message=message, param=param)
    finally:
        await deltas.aclose()
