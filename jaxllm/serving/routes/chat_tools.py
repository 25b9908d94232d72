"""/v1/chat/completions when the server runs tools itself: the rounds of `jaxllm.tools.loop.ToolLoop`.

Each round renders the conversation with every tool, generates, and runs the server's calls (off the event
loop: a tool may take its whole timeout). The last round's output is the response; usage counts every round.
With `include_tool_calls` (an extension) the message also lists the calls the server ran and their results
(`tool_steps`). Streamed, the rounds run first and the answer comes in one content chunk: the text of a round
is only known to be the answer once it ends without server calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.outputs import CompletionOutput
from jaxllm.serving.routes.chat_format import calls_of, choice_of
from jaxllm.serving.routes.common import adapter_of, resolve_max_tokens, tracked, usage
from jaxllm.serving.sse import DONE, event
from jaxllm.structured import tool_choice
from jaxllm.structured.tool_calls import format_for
from jaxllm.tools.loop import ToolLoop

ROUNDS = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="jaxllm-tool-round")  # requests' tool rounds


async def chat_with_server_tools(state, req, rid: str, base: dict, start: float):
    llm = state.llm
    if req.n != 1:
        raise InvalidRequestError("n must be 1 when the server runs tools: each answer follows its own calls", "n")
    messages = [m.as_template_dict() for m in req.messages]
    loop = ToolLoop(llm.tools, messages, req.tools, req.tool_choice, llm.max_tool_rounds)
    fmt = format_for(llm.tokenizer.chat_template)
    prompt_tokens = completion_tokens = cached = 0
    while True:
        ids = llm.tokenizer.encode(
            llm.apply_chat_template(loop.template_messages(), tools=loop.tools), add_special_tokens=False
        )
        use_new = req.max_completion_tokens is not None
        param = "max_completion_tokens" if use_new else "max_tokens"
        requested = req.max_completion_tokens if use_new else req.max_tokens
        params = req.sampling_params(
            resolve_max_tokens(requested, len(ids), llm.max_model_len, param),
            (req.top_logprobs or 0) if req.logprobs else None,
        )
        params = tool_choice.forced(params, fmt, loop.tool_choice, loop.tools, req.parallel_tool_calls)
        out = CompletionOutput(0, "", [], None, logprobs=[])
        gen = state.engine.generate(
            ids, params, f"{rid}-{loop.rounds}", adapter_of(state, req.model), fmt if loop.parses_calls else None
        )
        async for delta in tracked(state, gen, start):
            out.add(delta)
            cached = max(cached, delta.cached_tokens)
        state.metrics.prompt_tokens.inc(len(ids))
        prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + len(out.token_ids)
        # On a pool of its own: a round may wait out a tool's timeout without taking the default pool's threads.
        if not await asyncio.get_running_loop().run_in_executor(ROUNDS, loop.take, out.text, out.tool_calls or []):
            break
    choice = choice_of(out, req.logprobs)
    if req.include_tool_calls:
        choice["message"]["tool_steps"] = [s.as_dict() for s in loop.steps]
    used = usage(prompt_tokens, completion_tokens, cached)
    state.metrics.requests.labels("200").inc()
    if not req.stream:
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": used})
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _as_stream(base, choice, out, used if include_usage else None)
    return StreamingResponse(events, media_type="text/event-stream")


async def _as_stream(base, choice, out, used):
    chunk = {**base, "object": "chat.completion.chunk"}
    delta = {"role": "assistant", "content": out.text if not out.tool_calls else (out.text or "")}
    if "tool_steps" in choice["message"]:
        delta["tool_steps"] = choice["message"]["tool_steps"]
    yield event(
        {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}]}
    )
    last = {"tool_calls": calls_of(out.tool_calls, first_index=0)} if out.tool_calls else {}
    yield event(
        {**chunk, "choices": [{"index": 0, "delta": last, "logprobs": None, "finish_reason": choice["finish_reason"]}]}
    )
    if used is not None:
        yield event({**chunk, "choices": [], "usage": used})
    yield DONE
