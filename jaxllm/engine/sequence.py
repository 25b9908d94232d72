"""One sequence being generated: its tokens and the stop conditions on them (host side, no JAX).

Text (detokenization, stop strings, tool calls) is the output processor's (`output_processor.py`); the scheduler
is the only one that changes a sequence once it is queued (`Scheduler.update`).
"""

from __future__ import annotations

import dataclasses

from jaxllm.sampling_params import SamplingParams


@dataclasses.dataclass
class TokenLogprob:
    """The logprob of a chosen token and of the most likely alternatives at that step. The texts of the tokens
    (`token`, `top_tokens`, in `top`'s order) are filled in by the output processor."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    token: str | None = None
    top_tokens: list[str] | None = None


@dataclasses.dataclass
class Sampled:
    """What the device returned for one sequence of a plan: its sampled tokens in order, with their logprobs
    when it asked for them."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class TokenOutput:
    """What one step produced for one sequence, in tokens: those it took (a token after a stop condition is
    not taken), their logprobs, and its prompt's logprobs once, with its first token. Whether and why it
    finished is on the sequence (`finish_reason`, `stop_reason`)."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Sequence:
    """A prompt and its growing output in tokens; decides when a token condition finishes it."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        eos_ids: tuple[int, ...],
        max_len: int,
    ):
        self.request_id, self.index = request_id, index
        self.prompt_ids, self.params, self.seed = list(prompt_ids), params, seed
        self.output_ids: list[int] = []
        # With params.prompt_logprobs: each prompt token's logprob given the tokens before it (the first has none),
        # filled in as the prompt's chunks are computed, and handed out once, with the first sampled token.
        wanted = params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] * len(prompt_ids) if wanted else None
        self.prompt_logprobs_sent = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.slot: int | None = None
        self.replica = 0  # the data-parallel replica whose slot and KV pages it uses, set on admission
        self.lora = -1  # the LoRA adapter slot its tokens run through (-1: none), set when it is queued
        self.matcher = None  # its output constraint's `jaxllm.structured.Matcher`, set when it is queued
        self.order = 0  # admission order, set by the scheduler: the highest is the newest
        self.num_computed = 0  # tokens already dispatched into the KV cache by prefill
        self.prefill_len = len(prompt_ids)  # tokens to prefill: the prompt, plus earlier outputs after preemption
        self.inflight = 0  # tokens dispatched to the device whose results are not read yet
        self.pages: list[int] = []  # its replica's KV pages holding positions [i * page_size, (i + 1) * page_size)
        self.hashes: list[bytes] = []  # prefix hashes of the full pages of its tokens (as far as computed)
        self.registered = 0  # leading pages made findable by prefix hash
        self.cached_tokens = 0  # prompt tokens found in the prefix cache on admission
        self.preemptions = 0
        self.max_len = max_len
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))

    @property
    def hash_salt(self) -> bytes:
        """What its prefix-cache digests start from: its adapter's pages are its own."""
        return b"" if self.lora < 0 else b"lora-slot-%d" % self.lora

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.prefill_len

    def token_ids(self) -> list[int]:
        """The prompt followed by the outputs so far."""
        return self.prompt_ids + self.output_ids

    def wants_more(self) -> bool:
        """True while tokens beyond those already in flight may still be needed."""
        return self.remaining() > self.inflight

    def remaining(self) -> int:
        """Tokens this sequence may still generate (by max_tokens and by the context)."""
        return min(self.params.max_tokens - len(self.output_ids), self.max_len - self.num_tokens)

    def append(self, token: int) -> bool:
        """Take one sampled token unless finished (False then); sets finish_reason when a token condition is met:
        a stop token (after min_tokens), a complete grammar, max_tokens or the context."""
        if self.finished:
            return False
        if self.remaining() <= 0:  # max_tokens 0: the prompt was only scored
            self.finish_reason = "length"
            return False
        self.output_ids.append(token)
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self.stop_ids and len(self.output_ids) > self.params.min_tokens:
            self.finish_reason, self.stop_reason = "stop", token
        elif self.matcher is not None and self.matcher.done:  # the constraint is complete: nothing may follow
            self.finish_reason = "stop"
        elif self.remaining() <= 0:
            self.finish_reason = "length"
        return True
