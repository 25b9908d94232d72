"""The streaming loop of a batch job: requests are read as room frees up, run on the engine together, and
each record is handed out the moment its request finishes.

At most `window` requests are in flight (admitted and not yet handed out), so memory stays bounded for any
number of requests. The KV cache is sized once for the first window (as `LLM.generate` sizes it for its
batch); a later request longer than that waits until the running ones finish, and the cache grows then
(`Engine.reserve` only runs while the engine is idle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable

from jaxllm.api import request_output
from jaxllm.batch.lines import BadLine
from jaxllm.batch.records import bad_line, failure
from jaxllm.batch.work import Work, prepare
from jaxllm.errors import InvalidRequestError, JaxLLMError

# Handed each record as it is ready, with whether its request ran (False: an error record).
Sink = Callable[[dict, bool], None]


@dataclasses.dataclass
class Stats:
    done: int = 0
    failed: int = 0
    tokens: int = 0  # generated


@dataclasses.dataclass
class _Job:
    """One admitted request: its work, the outputs its deltas add up to, the sequences still running; then
    its record (made at once, without work, for a line that cannot run or an embedding)."""

    order: int
    work: Work | None = None
    record: dict | None = None
    ok: bool = True
    outputs: list = dataclasses.field(default_factory=list)
    cached: list[int] = dataclasses.field(default_factory=list)  # prompt tokens found cached, per prompt
    open: int = 0  # sequences not finished


class BatchRunner:
    """Runs the items of a batch (`jaxllm.batch.lines` items) on `llm`'s engine, handing each record to `sink`.

    window: requests in flight at most (default four times the engine's max_num_seqs); ordered: hand records
    out in input order (a finished request then waits for the ones before it, still within the window) rather
    than as they finish; strict: the first line that cannot run raises `InvalidRequestError` naming it (`name`:
    the input's name in that message), after the requests in flight are aborted."""

    def __init__(
        self,
        llm,
        sink: Sink,
        window: int | None = None,
        ordered: bool = False,
        strict: bool = False,
        name: str = "input",
    ):
        self.llm, self.engine, self.sink = llm, getattr(llm, "engine", None), sink  # no engine: an Embedder
        self.window = window or 4 * (self.engine.max_num_seqs if self.engine is not None else 16)
        self.ordered, self.strict, self.name = ordered, strict, name
        self.stats = Stats()
        self._jobs: dict[int, _Job] = {}  # by admission order: in flight
        self._by_rid: dict[str, tuple[_Job, int]] = {}
        self._orders = itertools.count()
        self._next_out = 0  # with `ordered`: the order of the next record to hand out
        self._first: list[_Job] = []  # the first window, added once the cache is sized for it
        self._held: _Job | None = None  # a request longer than the cache is sized for: waits for idle
        self._reserved_len = 0

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet handed out."""
        return len(self._jobs)

    def run(self, items: Iterable) -> Stats:
        """Run every item; returns the counts. The engine is left idle, also when this raises."""
        it, exhausted = iter(items), False
        try:
            while True:
                while not exhausted and self._held is None and self.in_flight < self.window:
                    item = next(it, None)
                    if item is None:
                        exhausted = True
                    else:
                        self._take(item)
                if self._first and (exhausted or self.in_flight >= self.window or self._held is not None):
                    self._start()
                if self.engine is not None and self.engine.has_unfinished():
                    self._step()
                elif self._held is not None:
                    self._grow_and_add(self._held)
                elif exhausted:
                    return self.stats
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Leave nothing running behind: abort what is in flight and let the engine settle."""
        if self.engine is None:
            return
        for rid in self._by_rid:
            self.engine.abort(rid)
            self.llm.outputs.drop(rid)
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            while self.engine.has_unfinished():
                self.engine.step()

    # ---- admission ------------------------------------------------------------------------------
    def _take(self, item) -> None:
        order = next(self._orders)
        if isinstance(item, BadLine):
            self._fail(order, item)
            return
        try:
            work = prepare(item, self.llm)
        except (JaxLLMError, ValueError, TypeError) as e:
            self._fail(order, bad_line(item, e))
            return
        if isinstance(work, dict):  # done at once (an embedding)
            self._finish_now(order, work, True)
            return
        job = _Job(order, work, cached=[0] * len(work.prompts), open=work.sequences)
        self._jobs[order] = job
        if self._reserved_len == 0:
            self._first.append(job)
        elif work.longest > self._reserved_len:
            self._held = job
        else:
            self._add(job)

    def _start(self) -> None:
        """Size the cache for the first window and add it."""
        slots = sum(j.work.sequences for j in self._first)
        self._reserved_len = max(j.work.longest for j in self._first)
        self.engine.reserve(slots, self._reserved_len)
        for job in self._first:
            self._add(job)
        self._first = []

    def _grow_and_add(self, job: _Job) -> None:
        self._reserved_len = job.work.longest
        self.engine.reserve(self.engine.max_num_seqs, self._reserved_len)
        self._held = None
        self._add(job)

    def _add(self, job: _Job) -> None:
        w = job.work
        for i, ids in enumerate(w.prompts):
            seqs = self.engine.add_request(ids, w.params, lora=w.lora)
            self.llm.outputs.add(seqs, w.tool_format)
            job.outputs.append(request_output(seqs, None))
            self._by_rid[seqs[0].request_id] = (job, i)

    # ---- stepping -------------------------------------------------------------------------------
    def _step(self) -> None:
        for d in self.llm.outputs.step(self.engine):
            job, i = self._by_rid[d.request_id]
            out = job.outputs[i]
            out.outputs[d.index].add(d)
            if d.prompt_logprobs is not None:
                out.prompt_logprobs = d.prompt_logprobs
            job.cached[i] = max(job.cached[i], d.cached_tokens)
            self.stats.tokens += len(d.token_ids)
            if d.finish_reason is not None:
                job.open -= 1
                if job.open == 0:
                    for rid in {o.request_id for o in job.outputs}:
                        del self._by_rid[rid]
                    job.record = job.work.record(job.outputs, job.cached)
                    self._hand_out(job)

    # ---- handing out ----------------------------------------------------------------------------
    def _fail(self, order: int, bad: BadLine) -> None:
        if self.strict:
            raise InvalidRequestError(f"{self.name} {bad.message}")
        self._finish_now(order, failure(bad), False)

    def _finish_now(self, order: int, record: dict, ok: bool) -> None:
        self._jobs[order] = job = _Job(order, record=record, ok=ok)
        self._hand_out(job)

    def _hand_out(self, job: _Job) -> None:
        if not self.ordered:
            self._emit(self._jobs.pop(job.order))
            return
        while self._next_out in self._jobs and self._jobs[self._next_out].record is not None:
            self._emit(self._jobs.pop(self._next_out))
            self._next_out += 1

    def _emit(self, job: _Job) -> None:
        if job.ok:
            self.stats.done += 1
        else:
            self.stats.failed += 1
        self.sink(job.record, job.ok)
