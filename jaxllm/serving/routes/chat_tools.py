"""/v1/chat/completions when the server runs tools itself: the rounds of `jaxllm.tools.loop.ToolLoop`.

Each round renders the conversation with every tool, generates, and runs the server's calls (off the event
loop: a tool may take its whole timeout). The last round's output is the response; usage counts every round.
With `include_tool_calls` (an extension) the message also lists the calls the server ran and their results
(`tool_steps`).

Streamed, every round's content streams as it is generated (the output processor holds back only what may be
a call). A round that ends in server calls is followed by one chunk carrying those steps (with
`include_tool_calls`) and the next round's content; the round that ends without them ends the stream, with its
calls for the client if it made any. An error after the stream has begun (a conversation grown past the
context, the engine shutting down) comes as an `error` event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from starlette.responses import JSONResponse, StreamingResponse

from jaxllm.errors import ContextLengthError, InvalidRequestError
from jaxllm.outputs import CompletionOutput
from jaxllm.serving.errors import error_body
from jaxllm.serving.routes.chat_format import calls_of, choice_of, logprobs_entries
from jaxllm.serving.routes.common import (
    adapter_of,
    chained,
    chat_inputs,
    first_and_rest,
    stream_failure,
    tracked,
    usage,
)
from jaxllm.serving.sse import DONE, event
from jaxllm.tools.loop import ToolLoop

ROUNDS = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="jaxllm-tool-round")  # requests' tool rounds


class ChatRounds:
    """One chat request's rounds (one round when no tool the server runs is called; the Responses route uses it
    too) on the engine: `generate()` streams a round's deltas (collected into `out`), and
    `take()` runs its server calls, True when another round follows. Usage adds up over the rounds."""

    def __init__(self, state, req, rid: str, start: float):
        self.state, self.req, self.rid, self.start = state, req, rid, start
        llm = state.llm
        messages = [m.as_template_dict() for m in req.messages]
        self.loop = ToolLoop(llm.tools, messages, req.tools, req.tool_choice, llm.max_tool_rounds)
        self.prompt_tokens = self.completion_tokens = self.cached = 0
        self.out = CompletionOutput(0, "", [], None, logprobs=[])

    def generate(self):
        """This round's deltas (an async iterator), after checking its prompt fits the context."""
        llm, req, loop = self.state.llm, self.req, self.loop
        try:
            ids, params, fmt = chat_inputs(llm, req, loop.template_messages(), loop.tools, loop.tool_choice)
        except ContextLengthError as e:
            if not loop.rounds:
                raise
            raise ContextLengthError(
                f"with the results of {len(loop.steps)} tool calls the conversation no longer fits this model's "
                f"{llm.max_model_len}-token context with {e.param}: ask for less, or use tools whose results are "
                "shorter",
                param=e.param,
            ) from None
        self.out = CompletionOutput(0, "", [], None, logprobs=[])
        self.state.metrics.prompt_tokens.inc(len(ids))
        self.prompt_tokens += len(ids)
        gen = self.state.engine.generate(
            ids,
            params,
            f"{self.rid}-{loop.rounds}",
            adapter_of(self.state, req.model),
            fmt if loop.parses_calls else None,
        )
        return self._collected(tracked(self.state, gen, self.start))

    async def _collected(self, stream):
        async for delta in stream:
            self.out.add(delta)
            self.completion_tokens += len(delta.token_ids)
            self.cached = max(self.cached, delta.cached_tokens)
            yield delta

    async def take(self) -> bool:
        """Run the round's server calls (on a pool of their own: a round may wait out a tool's timeout without
        taking the default pool's threads); True when another round follows."""
        run = asyncio.get_running_loop().run_in_executor
        return await run(ROUNDS, self.loop.take, self.out.text, self.out.tool_calls or [])

    @property
    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached)


async def chat_with_server_tools(state, req, rid: str, base: dict, start: float):
    if req.n != 1:
        raise InvalidRequestError("n must be 1 when the server runs tools: each answer follows its own calls", "n")
    rounds = ChatRounds(state, req, rid, start)
    if req.stream:
        first, rest = await first_and_rest(rounds.generate())  # the first round's errors are the response's
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(state, rounds, base, first, rest, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    while True:
        async for _ in rounds.generate():
            pass
        if not await rounds.take():
            break
    choice = choice_of(rounds.out, req.logprobs)
    if req.include_tool_calls:
        choice["message"]["tool_steps"] = [s.as_dict() for s in rounds.loop.steps]
    state.metrics.requests.labels("200").inc()
    return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": rounds.usage})


async def _events(state, rounds: ChatRounds, base: dict, first, rest, include_usage: bool):
    """The stream's chunks over every round (see the module docstring)."""
    chunk = {**base, "object": "chat.completion.chunk"}
    req = rounds.req

    def choice(delta, lp=None, reason=None):
        return event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]})

    yield choice({"role": "assistant", "content": ""})
    deltas = chained(first, rest)
    try:
        while True:
            async for delta in deltas:
                lp = {"content": logprobs_entries(delta.logprobs)} if req.logprobs and delta.logprobs else None
                if delta.text or lp:
                    yield choice({"content": delta.text} if delta.text else {}, lp)
            ran = len(rounds.loop.steps)
            if not await rounds.take():
                break
            if req.include_tool_calls:
                yield choice({"tool_steps": [s.as_dict() for s in rounds.loop.steps[ran:]]})
            deltas = rounds.generate()
        out = rounds.out
        last = {"tool_calls": calls_of(out.tool_calls, first_index=0)} if out.tool_calls else {}
        yield choice(last, None, out.finish_reason)
        if include_usage:
            yield event({**chunk, "choices": [], "usage": rounds.usage})
        state.metrics.requests.labels("200").inc()
    except Exception as e:  # noqa: BLE001 — the response has begun: the error is an event of the stream
        yield event(error_body(*stream_failure(state, e, "a streamed chat with server tools")))
    finally:
        await deltas.aclose()
    yield DONE
