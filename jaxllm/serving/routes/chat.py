"""POST /v1/chat/completions."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.outputs import CompletionOutput
from jaxllm.serving.protocol import ChatCompletionRequest
from jaxllm.serving.routes.chat_format import calls_of, choice_of, logprobs_entries
from jaxllm.serving.routes.chat_tools import chat_with_server_tools
from jaxllm.serving.routes.common import (
    adapter_of,
    chained,
    chat_inputs,
    first_and_rest,
    parse_body,
    request_id,
    tracked,
    usage,
)
from jaxllm.serving.sse import DONE, event


async def chat_completions(request: Request):
    state = request.app.state.server
    start = time.monotonic()
    req = await parse_body(request, state, ChatCompletionRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    llm = state.llm
    if len(llm.tools):
        base = {"id": request_id("chatcmpl"), "created": int(time.time()), "model": req.model}
        return await chat_with_server_tools(state, req, base["id"], base, start)
    messages = [m.as_template_dict() for m in req.messages]
    ids, params, fmt = chat_inputs(llm, req, messages, req.tools, req.tool_choice)
    tools = fmt if req.tools and req.tool_choice != "none" else None  # parse calls out of the output
    rid, created = request_id("chatcmpl"), int(time.time())
    gen = state.engine.generate(ids, params, rid, adapter_of(state, req.model), tools)
    stream = tracked(state, gen, start)
    first, rest = await first_and_rest(stream)
    state.metrics.prompt_tokens.inc(len(ids))
    base = {"id": rid, "created": created, "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(state, base, first, rest, len(ids), include_usage, req.logprobs)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = [CompletionOutput(i, "", [], None, logprobs=[]) for i in range(params.n)]
    cached = 0
    if first is not None:
        choices[first.index].add(first)
        cached = first.cached_tokens
    async for out in rest:
        choices[out.index].add(out)
        cached = max(cached, out.cached_tokens)
    body = {
        **base,
        "object": "chat.completion",
        "choices": [choice_of(c, req.logprobs) for c in choices],
        "usage": usage(len(ids), sum(len(c.token_ids) for c in choices), cached),
    }
    state.metrics.requests.labels("200").inc()
    return JSONResponse(body)


async def _events(state, base, first, rest, prompt_len, include_usage, logprobs):
    """The stream's chunks; with tools, each call comes as a tool-call delta as soon as
    it is complete, content streaming around them, and the last chunk has finish_reason "tool_calls"."""
    chunk = {**base, "object": "chat.completion.chunk"}
    completion = cached = 0
    started = set()
    calls_sent: dict[int, int] = {}

    def choice(index, delta, lp=None, reason=None):
        return event({**chunk, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}]})

    try:
        async for out in chained(first, rest):
            if out.index not in started:
                started.add(out.index)
                yield choice(out.index, {"role": "assistant", "content": ""})
            completion += len(out.token_ids)
            cached = max(cached, out.cached_tokens)
            lp = {"content": logprobs_entries(out.logprobs)} if logprobs else None
            if out.text or (lp and out.logprobs) or (out.finish_reason and not out.tool_calls):
                yield choice(
                    out.index,
                    {"content": out.text} if out.text else {},
                    lp,
                    None if out.tool_calls else out.finish_reason,
                )
            if out.tool_calls:
                k = calls_sent.get(out.index, 0)
                calls_sent[out.index] = k + len(out.tool_calls)
                yield choice(
                    out.index, {"tool_calls": calls_of(out.tool_calls, first_index=k)}, None, out.finish_reason
                )
        if include_usage:
            yield event({**chunk, "choices": [], "usage": usage(prompt_len, completion, cached)})
        yield DONE
        state.metrics.requests.labels("200").inc()
    finally:
        await rest.aclose()
