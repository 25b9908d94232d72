"""The synchronous engine: the scheduler's plan in, compiled steps dispatched, updates out.

Plain Python around the runner and the scheduler. Each `step()` dispatches this step's prefill
chunks and decode before reading the previous step's tokens back, so the device never waits on the
host; tokens that arrive for a sequence that has finished meanwhile are dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import defaultdict

import numpy as np

from jaxllm.engine import buckets
from jaxllm.engine.runner import ModelRunner, PrefillBatch, flags_for, row_params
from jaxllm.engine.scheduler import Plan, PrefillChunk, Scheduler
from jaxllm.engine.sequence import Sequence, TokenLogprob, Update
from jaxllm.errors import ContextLengthError, InvalidRequestError
from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass
class _Dispatched:
    """Device results of one step, with the sequence each row belonged to when it was dispatched."""

    prefills: list[tuple[object, object, dict[int, Sequence]]]
    decode: tuple[object, object, dict[int, Sequence]] | None


class Engine:
    """add_request / abort / step() over a ModelRunner and a Scheduler. One thread drives it."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_num_seqs: int,
        max_model_len: int,
        token_budget: int = 2048,
        max_waiting: int | None = None,
    ):
        self.runner, self.tokenizer = runner, tokenizer
        self.cfg = runner.cfg
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.scheduler = Scheduler(0, token_budget, max_waiting, runner.decode_steps)
        self.prefilled_tokens = 0  # prompt tokens computed so far (for tests and metrics)
        self._inflight: _Dispatched | None = None
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
        """Queue `params.n` sequences for this prompt and return them; results come through step()."""
        self.check_prompt(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        now = time.monotonic()
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
                now,
            )
            for i in range(params.n)
        ]
        self.scheduler.add(seqs)
        return seqs

    def abort(self, request_id: str) -> list[Sequence]:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- capacity -------------------------------------------------------------------------------
    def reserve(self, slots: int, max_len: int) -> None:
        """Size the cache for `slots` sequences of `max_len` tokens (only while idle)."""
        assert not self.scheduler.running and self._inflight is None, "reserve() while sequences are running"
        slots = min(buckets.next_pow2(slots), self.max_num_seqs)
        self.runner.ensure_capacity(slots, min(buckets.next_pow2(max_len, 64), self.max_model_len))
        self.scheduler.resize(self.runner.slots)

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> list[Update]:
        """Dispatch the next plan, then read back and apply the previous step's tokens."""
        if self.runner.cache is None:
            self.reserve(self.max_num_seqs, self.max_model_len)
        plan = self.scheduler.schedule()
        current = self._dispatch(plan) if not plan.empty else None
        updates = self._process(self._inflight) if self._inflight is not None else []
        self._inflight = current
        return updates

    def _dispatch(self, plan: Plan) -> _Dispatched:
        groups: dict[tuple[int, int], list[PrefillChunk]] = defaultdict(list)
        for c in plan.prefills:
            length = buckets.seq_bucket(c.end - c.start, self.runner.max_len)
            ctx = buckets.attn_bucket(c.start, self.runner.max_len) if c.start else 0
            groups[(length, ctx)].append(c)
        prefills = []
        for (length, ctx), chunks in groups.items():
            limit = self.runner.prefill_rows(length)
            for i in range(0, len(chunks), limit):
                prefills.append(self._prefill(chunks[i : i + limit], length, ctx))
        decode = self._decode(plan.decodes, plan.decode_steps) if plan.decodes else None
        return _Dispatched(prefills, decode)

    def _prefill(self, chunks: list[PrefillChunk], length: int, ctx: int):
        rows = buckets.batch_bucket(len(chunks), self.runner.prefill_rows(length))
        tokens = np.zeros((rows, length), np.int32)
        starts = np.zeros((rows,), np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.runner.slots, np.int32)  # padding rows write nowhere
        bias = np.zeros((rows, self.cfg.vocab_size), np.float32)
        for i, c in enumerate(chunks):
            tokens[i, : c.end - c.start] = c.seq.prompt_ids[c.start : c.end]
            starts[i], lengths[i], slots[i] = c.start, c.end - c.start, c.seq.slot
            for tok, b in c.seq.params.logit_bias.items():
                bias[i, tok] = b
        self.prefilled_tokens += sum(c.end - c.start for c in chunks)
        plist = [c.seq.params for c in chunks]
        seeds = [c.seq.seed for c in chunks]
        batch = PrefillBatch(tokens, starts, lengths, slots, row_params(plist, seeds, rows), bias, ctx)
        first, info = self.runner.prefill(batch, flags_for(plist))
        return first, info, {i: c.seq for i, c in enumerate(chunks) if c.last}

    def _decode(self, seqs: list[Sequence], steps: int):
        by_slot = {s.slot: s for s in seqs}
        rows = buckets.batch_bucket(max(by_slot) + 1, self.runner.slots)
        plist = [by_slot.get(i) for i in range(rows)]
        params = [s.params if s else None for s in plist]
        seeds = [s.seed if s else 0 for s in plist]
        active = np.array([s is not None for s in plist])
        longest = max(s.num_tokens + s.inflight for s in seqs)
        attn = buckets.attn_bucket(longest, self.runner.max_len)
        toks, info = self.runner.decode(row_params(params, seeds, rows), active, rows, attn, flags_for(params), steps)
        return toks, info, by_slot

    def _process(self, done: _Dispatched) -> list[Update]:
        updates = []
        for first, info, seqs in done.prefills:
            if seqs:
                toks = np.asarray(first)[:, None]
                info = None if info is None else tuple(np.asarray(x)[:, None] for x in info)
                updates += self._apply(toks, info, seqs)
        if done.decode is not None:
            toks, info, seqs = done.decode
            toks = np.asarray(toks).T  # [rows, steps]
            info = None if info is None else tuple(np.swapaxes(np.asarray(x), 0, 1) for x in info)
            updates += self._apply(toks, info, seqs)
        return updates

    def _apply(self, toks: np.ndarray, info, seqs: dict[int, Sequence]) -> list[Update]:
        """toks [rows, steps]; info arrays [rows, steps, ...]; seqs maps row -> sequence."""
        updates = []
        for row, s in seqs.items():
            s.inflight -= toks.shape[1]
            if s.finished:
                continue
            new, lps = [], []
            for j in range(toks.shape[1]):
                lp = _logprob(s, info, row, j, int(toks[row, j]))
                if lp is not None:
                    lps.append(lp)
                new.append(int(toks[row, j]))
                s.append(new[-1], lp)
                if s.finished:
                    break
            if s.finished:
                self.scheduler.release(s)
            updates.append(Update(s, new, s.take_delta(), lps, s.finished))
        return updates


def _logprob(s: Sequence, info, row: int, j: int, token: int) -> TokenLogprob | None:
    if s.params.logprobs is None or info is None:
        return None
    k = s.params.logprobs
    top = list(zip(info[1][row, j, :k].tolist(), info[2][row, j, :k].tolist(), strict=True))
    return TokenLogprob(token, float(info[0][row, j]), top)
