"""POST /v1/chat/completions."""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.serving.protocol import ChatCompletionRequest
from jaxllm.serving.routes.common import (
    adapter_of,
    first_and_rest,
    parse_body,
    request_id,
    resolve_max_tokens,
    tracked,
    usage,
)
from jaxllm.serving.sse import DONE, event
from jaxllm.structured import tool_choice
from jaxllm.structured.tool_calls import ToolCallStream, format_for
from jaxllm.structured.tool_calls import parse as parse_tool_calls


def _logprobs(tokenizer, lps) -> list[dict]:
    def entry(tok_id, lp):
        text = tokenizer.token_str(tok_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]


async def chat_completions(request: Request):
    state = request.app.state.server
    start = time.monotonic()
    req = await parse_body(request, state, ChatCompletionRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    llm = state.llm
    prompt = llm.apply_chat_template([m.as_template_dict() for m in req.messages], tools=req.tools)
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    use_new = req.max_completion_tokens is not None
    param = "max_completion_tokens" if use_new else "max_tokens"
    max_tokens = resolve_max_tokens(
        req.max_completion_tokens if use_new else req.max_tokens, len(ids), llm.max_model_len, param
    )
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    fmt = format_for(llm.tokenizer.chat_template)
    must = tool_choice.chosen(req.tool_choice, req.tools)
    if must is not None:
        if params.structured is not None:
            raise InvalidRequestError("tool_choice cannot be combined with an output format", param="tool_choice")
        params = dataclasses.replace(params, grammar=tool_choice.call_grammar(fmt, must, req.parallel_tool_calls))
    tools = fmt if req.tools and req.tool_choice != "none" else None  # parse calls out of the output
    rid, created = request_id("chatcmpl"), int(time.time())
    stream = tracked(state, state.engine.generate(ids, params, rid, adapter_of(state, req.model)), start)
    first, rest = await first_and_rest(stream)
    state.metrics.prompt_tokens.inc(len(ids))
    base = {"id": rid, "created": created, "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(state, base, first, rest, len(ids), params.n, include_usage, req.logprobs, tools)
        return StreamingResponse(events, media_type="text/event-stream")
    texts, tokens = [""] * params.n, [0] * params.n
    lps, finish = [[] for _ in range(params.n)], [None] * params.n
    outs = [first] if first is not None else []
    async for out in rest:
        outs.append(out)
    cached = 0
    for out in outs:
        cached = max(cached, out.cached_tokens)
        texts[out.index] += out.text
        tokens[out.index] += len(out.token_ids)
        lps[out.index] += out.logprobs
        finish[out.index] = out.finish_reason or finish[out.index]
    choices = []
    for i in range(params.n):
        message, reason = {"role": "assistant", "content": texts[i]}, finish[i]
        if tools is not None:
            content, calls = parse_tool_calls(texts[i], tools)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": _calls(calls)}
                reason = "tool_calls"
        lp = {"content": _logprobs(llm.tokenizer, lps[i])} if req.logprobs else None
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
    state.metrics.requests.labels("200").inc()
    body = {**base, "object": "chat.completion", "choices": choices, "usage": usage(len(ids), sum(tokens), cached)}
    return JSONResponse(body)


def _calls(calls, with_index: bool = False) -> list[dict]:
    """OpenAI's tool_calls entries (with their index, for stream deltas)."""
    out = []
    for k, c in enumerate(calls):
        entry = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": k, **entry} if with_index else entry)
    return out


async def _events(state, base, first, rest, prompt_len, n, include_usage, logprobs, tools=None):
    """The stream's chunks; with `tools` (a tool-call format), content passes through a `ToolCallStream` and
    the calls come as one delta each at the end, with finish_reason "tool_calls"."""
    chunk = {**base, "object": "chat.completion.chunk"}
    completion = cached = 0
    started = set()
    streams: dict[int, ToolCallStream] = {}

    async def all_outputs():
        if first is not None:
            yield first
        async for out in rest:
            yield out

    try:
        async for out in all_outputs():
            if out.index not in started:
                started.add(out.index)
                delta = {"role": "assistant", "content": ""}
                yield event(
                    {
                        **chunk,
                        "choices": [{"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None}],
                    }
                )
            completion += len(out.token_ids)
            cached = max(cached, out.cached_tokens)
            text, reason, calls = out.text, out.finish_reason, []
            if tools is not None:
                parser = streams.setdefault(out.index, ToolCallStream(tools))
                text = parser.feed(text)
                if reason is not None:
                    tail, calls = parser.finish()
                    text += tail
                    reason = "tool_calls" if calls else reason
            if text or reason or (logprobs and out.logprobs):
                lp = {"content": _logprobs(state.llm.tokenizer, out.logprobs)} if logprobs else None
                delta = {"content": text} if text else {}
                if calls:
                    yield event(
                        {
                            **chunk,
                            "choices": [{"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": None}],
                        }
                    )
                    delta, lp = {"tool_calls": _calls(calls, with_index=True)}, None
                yield event(
                    {
                        **chunk,
                        "choices": [{"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                    }
                )
        if include_usage:
            yield event({**chunk, "choices": [], "usage": usage(prompt_len, completion, cached)})
        yield DONE
        state.metrics.requests.labels("200").inc()
    finally:
        await rest.aclose()
