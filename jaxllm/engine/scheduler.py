"""The scheduler: which sequences run this step, how much of each is prefilled, which pages they use. No JAX.

There are no phases: every sequence has tokens computed (in the KV cache) and tokens it needs; each
step hands out a token budget. Running sequences that are fully prefilled decode; the budget
prefills prompts in chunks, first for sequences already holding a slot, then for new ones admitted
first come, first served while slots and pages are free. Decodes do not draw on the budget: they run
as their own compiled call, whose cost hardly depends on the prefill beside it, and charging them
would cut a prompt that just fits the budget into two chunks whenever anything else is decoding.

KV memory comes in pages from a `PagePool`. A new sequence starts from the longest prefix of its
prompt already cached and prefills only the rest. When the pool runs dry, the newest running
sequence is preempted: its pages are freed (and stay findable by prefix hash) and it goes back to
the front of the waiting queue, to be recomputed from its prompt and the outputs it already has.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools

from jaxllm.engine.kv_pages import PagePool, page_hashes
from jaxllm.engine.sequence import Sequence
from jaxllm.errors import QueueFullError


@dataclasses.dataclass
class PrefillChunk:
    """Tokens [start, end) of `seq` to write into its pages; the last chunk samples a token. `first`: the
    first chunk since the sequence was admitted (tokens before `start` came from the prefix cache)."""

    seq: Sequence
    start: int
    end: int
    first: bool = False

    @property
    def last(self) -> bool:
        return self.end == self.seq.prefill_len


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
    """FCFS admission into `max_seqs` slots and the pool's pages, chunked prefill under `token_budget`,
    decode of the rest, preemption of the newest when pages run out."""

    def __init__(
        self,
        max_seqs: int,
        token_budget: int,
        max_waiting: int | None = None,
        decode_steps: int = 1,
        pool: PagePool | None = None,
    ):
        self.max_seqs, self.token_budget = max_seqs, token_budget
        self.max_waiting, self.decode_steps = max_waiting, decode_steps
        self.pool = pool or PagePool(0, 16)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self.preemptions = 0
        self._free = list(range(max_seqs))
        heapq.heapify(self._free)
        self._order = itertools.count()
        self._to_register: list[Sequence] = []

    def resize(self, max_seqs: int, pool: PagePool) -> None:
        """Change the number of slots and the page pool (only while nothing runs)."""
        assert not self.running, "resize() while sequences are running"
        self.max_seqs, self.pool = max_seqs, pool
        self._free = list(range(max_seqs))
        heapq.heapify(self._free)

    # ---- requests -------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request, or refuse them all when the waiting queue is full."""
        if self.max_waiting is not None and len(self.waiting) + len(seqs) > self.max_waiting:
            # Preempted sequences finished by their late results still wait for their turn to leave.
            self.waiting = collections.deque(s for s in self.waiting if not s.finished)
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
        """Give back a finished sequence's slot and pages."""
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            self._free_pages(seq)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Plan one step. Marks chunks as computed and decodes as in flight (their results come later)."""
        # While prompts wait or are being prefilled, decode one step at a time so that they join the
        # batch soon; in steady state run several steps per dispatch.
        # Pages written by the previous step's prefills become findable now: a request admitted in the
        # same step as the one writing them would read them before they are written.
        for seq in self._to_register:
            self._register(seq, seq.num_computed)
        busy = self.waiting or any(not s.prefilled for s in self.running.values())
        steps = 1 if busy else self.decode_steps
        decodes = []
        for s in self._by_age(lambda s: s.prefilled and not s.finished and s.wants_more()):
            # This step writes positions up to num_tokens + inflight + steps - 2, of which those past
            # the sequence's last token are never read: no pages for them (their writes are dropped).
            useful = min(s.inflight + steps, s.remaining())
            if s.slot is not None and self._grow(s, s.num_tokens + useful - 1):
                decodes.append(s)
        budget = self.token_budget
        prefills = []
        for s in self._by_age(lambda s: not s.prefilled):
            if budget <= 0:
                break
            chunk = self._chunk(s, budget, preempt=True) if s.slot is not None else None
            if chunk is not None:
                prefills.append(chunk)
                budget -= chunk.end - chunk.start
        while self.waiting and self._free and budget > 0:
            chunk = self._admit(budget)
            if chunk is None:
                break
            prefills.append(chunk)
            budget -= chunk.end - chunk.start
        decodes = [s for s in decodes if s.slot is not None]  # drop any preempted by a later prefill
        for s in decodes:
            s.inflight += steps
        self._to_register = [c.seq for c in prefills if c.seq.slot is not None]
        return Plan(prefills, decodes, steps)

    def _by_age(self, keep) -> list[Sequence]:
        return sorted((s for s in self.running.values() if keep(s)), key=lambda s: s.order)

    def _admit(self, budget: int) -> PrefillChunk | None:
        """Give the first waiting sequence a slot, its cached prefix and its first chunk's pages."""
        while self.waiting and self.waiting[0].finished:  # finished by results that arrived after preemption
            self.waiting.popleft()
        if not self.waiting or self.waiting[0].inflight:  # a preempted sequence's last tokens are on the way
            return None
        s = self.waiting[0]
        tokens = s.token_ids()
        s.prefill_len = len(tokens)
        s.hashes = page_hashes(tokens, self.pool.page_size) if self.pool.prefix_caching else []
        usable = (len(tokens) - 1) // self.pool.page_size  # the last token is always computed
        cached = self.pool.cached_prefix(s.hashes, usable)
        if cached < min(usable, len(s.hashes)) and s.hashes[cached] in self._pending_hashes():
            return None  # a running sequence is computing the next pages of this prefix: wait for them
        s.pages = self.pool.match_prefix(s.hashes, usable)
        s.num_computed = len(s.pages) * self.pool.page_size
        chunk = self._chunk(s, budget, preempt=False)
        if chunk is None:
            self.pool.free(s.pages)
            s.pages, s.num_computed = [], 0
            return None
        chunk.first = True
        self.pool.record_lookup(min(usable, len(s.hashes)), chunk.start // self.pool.page_size)
        if not s.preemptions:
            s.cached_tokens = chunk.start
        self.waiting.popleft()
        s.slot = heapq.heappop(self._free)
        s.order = next(self._order)
        self.running[s.slot] = s
        return chunk

    def _chunk(self, s: Sequence, budget: int, preempt: bool) -> PrefillChunk | None:
        """The next chunk of s: all of the rest if it fits the budget, else a power of two within it; None
        when its pages cannot be had (after preempting newer sequences, if allowed)."""
        rest = s.prefill_len - s.num_computed
        size = rest if rest <= budget else 1 << (budget.bit_length() - 1)
        end = s.num_computed + size
        if not (self._grow(s, end) if preempt else self._extend(s, end)):
            return None
        chunk = PrefillChunk(s, s.num_computed, end)
        s.num_computed = end
        if chunk.last:
            s.inflight += 1
        return chunk

    # ---- pages ----------------------------------------------------------------------------------
    def _extend(self, s: Sequence, tokens: int) -> bool:
        """Give s pages for its first `tokens` positions, if the pool has them."""
        need = self.pool.pages_for(tokens) - len(s.pages)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        s.pages += got
        return True

    def _grow(self, s: Sequence, tokens: int) -> bool:
        """Like _extend, preempting the newest running sequences while pages are short; False when s itself
        had to go."""
        while not self._extend(s, tokens):
            victim = max(self.running.values(), key=lambda r: r.order)
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _preempt(self, s: Sequence) -> None:
        del self.running[s.slot]
        heapq.heappush(self._free, s.slot)
        self._free_pages(s)
        s.slot, s.num_computed = None, 0
        s.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(s)

    def _free_pages(self, s: Sequence) -> None:
        """Free s's pages, first making its full pages of known, written tokens findable by prefix."""
        # Decoding: every token but the last sampled one has its keys/values written (or being written).
        written = s.num_tokens - 1 if s.prefilled else s.num_computed
        self._register(s, written)
        self.pool.free(s.pages)
        s.pages, s.registered = [], 0
        if s in self._to_register:
            self._to_register.remove(s)

    def _register(self, s: Sequence, written: int) -> None:
        """Make s's full pages among its first `written` positions findable by prefix hash."""
        if self.pool.prefix_caching and s.pages:
            n = written // self.pool.page_size
            if len(s.hashes) < n:
                s.hashes = page_hashes(s.token_ids()[:written], self.pool.page_size, s.hashes)
            self.pool.register(s.pages[:n], s.hashes[:n])
            s.registered = max(s.registered, n)

    def _pending_hashes(self) -> set[bytes]:
        """Prefix hashes of pages that running sequences will have written soon but are not findable yet."""
        return {h for s in self.running.values() for h in s.hashes[s.registered :]}
