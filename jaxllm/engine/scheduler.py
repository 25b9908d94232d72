"""The scheduler: which sequences run this step, and how much of each prompt is prefilled. No JAX here.

There are no phases: every sequence has tokens computed (in the KV cache) and tokens it needs; each
step hands out a token budget. Running sequences that are fully prefilled decode (one token of
budget each); the rest of the budget prefills prompts in chunks, first for sequences already
holding a slot, then for new ones admitted first come, first served while slots are free.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

from jaxllm.engine.sequence import Sequence
from jaxllm.errors import QueueFullError


@dataclasses.dataclass
class PrefillChunk:
    """Prompt tokens [start, end) of `seq` to write into its slot; the last chunk samples a token."""

    seq: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


@dataclasses.dataclass
class Plan:
    """What one step runs: prefill chunks and the sequences that decode."""

    prefills: list[PrefillChunk]
    decodes: list[Sequence]
    decode_steps: int = 1

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """FCFS admission into `max_seqs` slots, chunked prefill under `token_budget`, decode of the rest."""

    def __init__(self, max_seqs: int, token_budget: int, max_waiting: int | None = None, decode_steps: int = 1):
        self.max_seqs, self.token_budget = max_seqs, token_budget
        self.max_waiting, self.decode_steps = max_waiting, decode_steps
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self._free = list(range(max_seqs))
        heapq.heapify(self._free)

    def resize(self, max_seqs: int) -> None:
        """Change the number of slots (only while nothing runs)."""
        assert not self.running, "resize() while sequences are running"
        self.max_seqs = max_seqs
        self._free = list(range(max_seqs))
        heapq.heapify(self._free)

    # ---- requests -------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request, or refuse them all when the waiting queue is full."""
        if self.max_waiting is not None and len(self.waiting) + len(seqs) > self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} sequences): retry later")
        self.waiting.extend(seqs)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with reason 'abort' and free their slots at once."""
        hit = [s for s in self.waiting if s.request_id == request_id]
        self.waiting = collections.deque(s for s in self.waiting if s.request_id != request_id)
        hit += [s for s in self.running.values() if s.request_id == request_id]
        for s in hit:
            if not s.finished:
                s.finish_reason = "abort"
            self.release(s)
        return hit

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Plan one step. Marks chunks as computed and decodes as in flight (their results come later)."""
        decodes = [s for s in self.running.values() if s.prefilled and not s.finished and s.wants_more()]
        budget = self.token_budget - len(decodes)
        prefills = []
        for s in sorted((s for s in self.running.values() if not s.prefilled), key=lambda s: s.arrival):
            if budget <= 0:
                break
            prefills.append(self._chunk(s, budget))
            budget -= prefills[-1].end - prefills[-1].start
        while self.waiting and self._free and budget > 0:
            s = self.waiting.popleft()
            s.slot = heapq.heappop(self._free)
            self.running[s.slot] = s
            prefills.append(self._chunk(s, budget))
            budget -= prefills[-1].end - prefills[-1].start
        # While prompts wait or are being prefilled, decode one step at a time so that they join the
        # batch soon; in steady state run several steps per dispatch.
        steps = 1 if prefills or self.waiting else self.decode_steps
        for s in decodes:
            s.inflight += steps
        return Plan(prefills, decodes, steps)

    def _chunk(self, s: Sequence, budget: int) -> PrefillChunk:
        """The next chunk of s's prompt: all of the rest if it fits, else a power of two within budget."""
        rest = len(s.prompt_ids) - s.num_computed
        size = rest if rest <= budget else 1 << (budget.bit_length() - 1)
        chunk = PrefillChunk(s, s.num_computed, s.num_computed + size)
        s.num_computed = chunk.end
        if chunk.last:
            s.inflight += 1
        return chunk
