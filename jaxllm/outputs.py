"""What generation returns: per-request outputs with text, token ids, finish reason, logprobs, usage."""

from __future__ import annotations

import dataclasses

from jaxllm.engine.sequence import TokenLogprob


@dataclasses.dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    # With tools: the calls the model wrote (`jaxllm.structured.tool_calls.ToolCall`); `text` is then the
    # content around them and finish_reason "tool_calls".
    tool_calls: list | None = None
    # With server tools: the calls the server ran on the way to this answer (`jaxllm.tools.loop.ToolStep`).
    tool_steps: list | None = None

    def add(self, delta: StreamDelta) -> None:
        """Append a streamed piece of this completion (the output processor's deltas add up to the whole)."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if self.logprobs is not None:
            self.logprobs += delta.logprobs
        if delta.tool_calls:
            self.tool_calls = (self.tool_calls or []) + delta.tool_calls
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
            if self.tool_calls:  # the content around the calls, as a whole parse gives it
                self.text = self.text.strip()


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class RequestOutput:
    """A request's prompt and its completions (all of them final once `finished`). prompt_logprobs (when
    asked for): one entry per prompt token, None for the first (nothing predicts it)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), sum(len(o.token_ids) for o in self.outputs))


@dataclasses.dataclass
class StreamDelta:
    """A piece of a streamed completion (`index` of n): new text and tokens since the previous delta.

    finish_reason (with its stop_reason: the stop string or token) comes with the last piece; tool_calls: the
    calls completed in this piece (with tools; then finish_reason is "tool_calls"); cached_tokens: prompt
    tokens found in the prefix cache (on each piece of completion 0); prompt_logprobs: once, with the first
    piece, when asked for (None for the first prompt token)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    stop_reason: str | int | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    tool_calls: list = dataclasses.field(default_factory=list)
    request_id: str = ""
