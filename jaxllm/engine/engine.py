"""The synchronous engine: admits sequences into cache slots, prefills, decodes, and reports updates.

Plain Python around the runner. Decode is pipelined: each `step()` dispatches the next decode
before reading the previous one back, so the device never waits on the host.
"""

from __future__ import annotations

import collections
import heapq
import itertools

import numpy as np

from jaxllm.engine import buckets
from jaxllm.engine.runner import ModelRunner, PrefillBatch, flags_for, row_params
from jaxllm.engine.sequence import Sequence, TokenLogprob, Update
from jaxllm.errors import ContextLengthError, InvalidRequestError
from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import Tokenizer


class Engine:
    """add_request / abort / step() over a ModelRunner. Not thread-safe: one thread drives it."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_num_seqs: int, max_model_len: int):
        self.runner, self.tokenizer = runner, tokenizer
        self.cfg = runner.cfg
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self._free: list[int] = []
        self._inflight = None
        self._rng = np.random.default_rng()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids, params: SamplingParams):
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token of text")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_model_len}: shorten it"
            )
        params.check_vocab(self.cfg.vocab_size)

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> list[Sequence]:
        """Queue `params.n` sequences for this prompt; returns them (finished ones report through step())."""
        self.check_prompt(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        seqs = [
            Sequence(
                request_id,
                i,
                prompt_ids,
                params,
                (base + 7919 * i) % 2**32,
                self.tokenizer,
                self.cfg.eos_token_ids,
                self.max_model_len,
            )
            for i in range(params.n)
        ]
        self.waiting.extend(seqs)
        return seqs

    def abort(self, request_id: str) -> None:
        self.waiting = collections.deque(s for s in self.waiting if s.request_id != request_id)
        for slot, s in list(self.running.items()):
            if s.request_id == request_id:
                s.finish_reason = "abort"
                self._release(slot)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    # ---- capacity -------------------------------------------------------------------------------
    def reserve(self, slots: int, max_len: int) -> None:
        """Size the cache for `slots` sequences of `max_len` tokens (only while idle)."""
        assert not self.running and self._inflight is None, "reserve() while sequences are running"
        slots = min(buckets.next_pow2(slots), self.max_num_seqs)
        self.runner.ensure_capacity(slots, min(buckets.next_pow2(max_len, 64), self.max_model_len))
        self._free = list(range(self.runner.slots))
        heapq.heapify(self._free)

    def _release(self, slot: int) -> None:
        self.running.pop(slot, None)
        heapq.heappush(self._free, slot)

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> list[Update]:
        """Admit what fits, dispatch the next decode, and process the previous one's tokens."""
        if self.runner.cache is None:
            self.reserve(1, self.max_model_len)
        updates = self._admit()
        nxt = self._dispatch_decode() if self._needs_more_decode() else None
        if self._inflight is not None:
            updates += self._process(*self._inflight)
        self._inflight = nxt
        return updates

    def _needs_more_decode(self) -> bool:
        pending = self._inflight[2] if self._inflight else 0
        return any(s.remaining() > pending for s in self.running.values())

    def _admit(self) -> list[Update]:
        updates = []
        while self.waiting and self._free:
            head = self.waiting[0]
            bucket = buckets.seq_bucket(len(head.prompt_ids), self.runner.max_len)
            limit = min(len(self._free), self.runner.prefill_rows(bucket))
            group = [s for s in self.waiting if buckets.seq_bucket(len(s.prompt_ids), self.runner.max_len) == bucket]
            group = group[:limit]
            for s in group:
                self.waiting.remove(s)
                s.slot = heapq.heappop(self._free)
                self.running[s.slot] = s
            updates += self._prefill(group, bucket)
        return updates

    def _prefill(self, group: list[Sequence], bucket: int) -> list[Update]:
        rows = buckets.batch_bucket(len(group), self.runner.prefill_rows(bucket))
        tokens = np.zeros((rows, bucket), np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.runner.slots, np.int32)  # padding rows write nowhere
        bias = np.zeros((rows, self.cfg.vocab_size), np.float32)
        for i, s in enumerate(group):
            tokens[i, : len(s.prompt_ids)] = s.prompt_ids
            lengths[i], slots[i] = len(s.prompt_ids), s.slot
            for tok, b in s.params.logit_bias.items():
                bias[i, tok] = b
        plist = [s.params for s in group]
        batch = PrefillBatch(tokens, lengths, slots, row_params(plist, [s.seed for s in group], rows), bias)
        first, info = self.runner.prefill(batch, flags_for(plist))
        first = np.asarray(first)[:, None]
        info = None if info is None else tuple(np.asarray(x)[:, None] for x in info)
        return self._apply(first, info, {i: s for i, s in enumerate(group)})

    def _dispatch_decode(self):
        last = max(self.running) + 1
        rows = buckets.batch_bucket(last, self.runner.slots)
        plist = [self.running.get(i) for i in range(rows)]
        params = [s.params if s else None for s in plist]
        seeds = [s.seed if s else 0 for s in plist]
        active = np.array([s is not None for s in plist])
        longest = max(s.num_tokens for s in self.running.values())
        attn = buckets.attn_bucket(longest + self.runner.decode_steps, self.runner.max_len)
        toks, info = self.runner.decode(row_params(params, seeds, rows), active, rows, attn, flags_for(params))
        snapshot = {i: s for i, s in enumerate(plist) if s is not None}
        return toks, info, self.runner.decode_steps, snapshot

    def _process(self, toks, info, _steps, snapshot) -> list[Update]:
        toks = np.asarray(toks).T  # [rows, steps]
        info = None if info is None else tuple(np.swapaxes(np.asarray(x), 0, 1) for x in info)
        return self._apply(toks, info, snapshot)

    def _apply(self, toks: np.ndarray, info, seqs: dict[int, Sequence]) -> list[Update]:
        """toks [rows, steps]; info arrays [rows, steps, ...]; seqs maps row -> sequence."""
        updates = []
        for row, s in seqs.items():
            if s.finished:
                continue
            new, lps = [], []
            for j in range(toks.shape[1]):
                lp = None
                if s.params.logprobs is not None and info is not None:
                    k = s.params.logprobs
                    top = list(zip(info[1][row, j, :k].tolist(), info[2][row, j, :k].tolist(), strict=True))
                    lp = TokenLogprob(int(toks[row, j]), float(info[0][row, j]), top)
                    lps.append(lp)
                new.append(int(toks[row, j]))
                s.append(int(toks[row, j]), lp)
                if s.finished:
                    break
            if s.finished and s.slot is not None and self.running.get(s.slot) is s:
                self._release(s.slot)
            updates.append(Update(s, new, s.take_delta(), lps, s.finished))
        return updates
