"""One sequence being generated: its tokens, text, logprobs and stop checks (host side, no JAX)."""

from __future__ import annotations

import dataclasses

from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class TokenLogprob:
    """The logprob of a chosen token and of the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Update:
    """What one step produced for one sequence."""

    seq: Sequence
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first token after the prompt


class Sequence:
    """A prompt and its growing output; decides when it is finished."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        tokenizer: Tokenizer,
        eos_ids: tuple[int, ...],
        max_len: int,
    ):
        self.request_id, self.index = request_id, index
        self.prompt_ids, self.params, self.seed = list(prompt_ids), params, seed
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
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
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.text = ""
        self._emitted = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1

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

    def append(self, token: int, logprob: TokenLogprob | None) -> None:
        """Take one sampled token; sets finish_reason when a stop condition is met."""
        if self.finished:
            return
        if self.remaining() <= 0:  # max_tokens 0: the prompt was only scored
            self.finish_reason = "length"
            return
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self.stop_ids and len(self.output_ids) > self.params.min_tokens:
            self.finish_reason, self.stop_reason = "stop", token
            self.text += self.detok.flush()
            return
        self.text += self.detok.add([token])
        if self.params.stop and self._check_stop_strings():
            return
        if self.matcher is not None and self.matcher.done:  # the constraint is complete: nothing may follow
            self.text += self.detok.flush()
            self.finish_reason = "stop"
            return
        if self.remaining() <= 0:
            self.text += self.detok.flush()
            self._check_stop_strings()
            if not self.finished:
                self.finish_reason = "length"

    def _check_stop_strings(self) -> bool:
        start = max(0, self._emitted - self._hold - 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i]
        self.finish_reason, self.stop_reason = "stop", s
        return True

    def take_delta(self) -> str:
        """Text not yet handed out; while running, the tail that could start a stop string is held back."""
        end = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
