"""POST /v1/completions."""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.sampling_params import SamplingParams
from jaxllm.serving.protocol import CompletionRequest
from jaxllm.serving.routes.common import adapter_of, merge, parse_body, request_id, resolve_max_tokens, tracked, usage
from jaxllm.serving.sse import DONE, event


def prompt_ids(llm, prompt) -> list[list[int]]:
    """The token ids of each prompt of a completions request (text, texts, token ids or lists of them)."""
    if isinstance(prompt, str):
        return [llm.tokenizer.encode(prompt)]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def completion_inputs(llm, req: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
    """What a completions request gives the engine: each prompt's token ids and the params (max_tokens resolved
    against the context; with echo, 0 scores the prompt alone and `logprobs` asks for the prompt's), each
    prompt checked by the engine."""
    prompts = prompt_ids(llm, req.prompt)
    least = 0 if req.echo else 1
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(req.max_tokens, longest, llm.max_model_len, "max_tokens", least)
    params = req.sampling_params(max_tokens, req.logprobs)
    if req.echo and req.logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    for p in prompts:
        llm.engine.check_prompt(p, params)
    return prompts, params


def legacy_logprobs(tokenizer, lps, offset: int, prompt: tuple[list[int], list] | None = None) -> dict:
    """OpenAI's legacy logprobs object for generated tokens `lps` (named by the output processor) whose text
    starts at `offset`; with `prompt` (its token ids and prompt logprobs: echo), the prompt's tokens come first
    from offset 0, the first with a null logprob as nothing predicts it."""
    entries = list(lps)
    if prompt is not None:
        entries, offset = list(prompt[1]) + entries, 0
    tokens = [lp.token if lp else tokenizer.token_str(prompt[0][0]) for lp in entries]
    chosen = [lp.logprob if lp else None for lp in entries]
    top = [dict(zip(lp.top_tokens, (v for _, v in lp.top), strict=True)) if lp else None for lp in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}


async def completions(request: Request):
    state = request.app.state.server
    start = time.monotonic()
    req = await parse_body(request, state, CompletionRequest)
    llm = state.llm
    prompts, params = completion_inputs(llm, req)
    rid, created = request_id("cmpl"), int(time.time())
    adapter = adapter_of(state, req.model)
    streams = [
        tracked(state, state.engine.generate(p, params, f"{rid}-{i}", adapter), start) for i, p in enumerate(prompts)
    ]
    merged = merge(streams)
    pending = []
    try:  # wait for the first output so that admission errors become a proper status
        pending.append(await merged.__anext__())
    except StopAsyncIteration:
        pass
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    base = {"id": rid, "created": created, "model": req.model}
    echo = [llm.tokenizer.decode(p) if req.echo else "" for p in prompts]

    async def outputs():
        for item in pending:
            yield item
        async for item in merged:
            yield item

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sum_prompt = sum(len(p) for p in prompts)
        return StreamingResponse(
            _events(state, base, outputs(), merged, params.n, prompts, echo, include_usage, sum_prompt, req.logprobs),
            media_type="text/event-stream",
        )
    k = len(prompts) * params.n
    texts, lps, finish, tokens = list(echo_for(echo, params.n)), [[] for _ in range(k)], [None] * k, 0
    scored: list = [None] * k  # each choice's prompt logprobs (echo with logprobs)
    cached = [0] * len(prompts)
    async for i, out in outputs():
        cached[i] = max(cached[i], out.cached_tokens)
        j = i * params.n + out.index
        texts[j] += out.text
        lps[j] += out.logprobs
        if out.prompt_logprobs is not None:
            scored[j] = (prompts[i], out.prompt_logprobs)
        finish[j] = out.finish_reason or finish[j]
        tokens += len(out.token_ids)
    choices = [
        {
            "index": j,
            "text": texts[j],
            "logprobs": legacy_logprobs(llm.tokenizer, lps[j], len(echo[j // params.n]), scored[j])
            if req.logprobs is not None
            else None,
            "finish_reason": finish[j],
        }
        for j in range(k)
    ]
    prompt_tokens = sum(len(p) for p in prompts)
    state.metrics.requests.labels("200").inc()
    body = {**base, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, tokens, sum(cached))}
    return JSONResponse(body)


def echo_for(echo: list[str], n: int):
    for e in echo:
        for _ in range(n):
            yield e


async def _events(state, base, outputs, merged, n, prompts, echo, include_usage, prompt_tokens, logprobs):
    chunk = {**base, "object": "text_completion"}
    completion = 0
    echoed = set()
    cached: dict[int, int] = {}
    try:
        async for i, out in outputs:
            cached[i] = max(cached.get(i, 0), out.cached_tokens)
            j = i * n + out.index
            text = out.text
            if echo[i] and j not in echoed:
                echoed.add(j)
                text = echo[i] + text
            completion += len(out.token_ids)
            if text or out.finish_reason or (logprobs is not None and out.logprobs):
                scored = (prompts[i], out.prompt_logprobs) if out.prompt_logprobs is not None else None
                lp = legacy_logprobs(state.llm.tokenizer, out.logprobs, 0, scored) if logprobs is not None else None
                yield event(
                    {
                        **chunk,
                        "choices": [{"index": j, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}],
                    }
                )
        if include_usage:
            yield event({**chunk, "choices": [], "usage": usage(prompt_tokens, completion, sum(cached.values()))})
        yield DONE
        state.metrics.requests.labels("200").inc()
    finally:
        await merged.aclose()
