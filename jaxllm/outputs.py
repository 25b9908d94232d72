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
    """A piece of a streamed completion: new text and tokens since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
