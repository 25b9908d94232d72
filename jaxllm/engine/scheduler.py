"""The scheduler: which sequences run this step, how much of each is prefilled, which pages they use. No JAX.

There are no phases: every sequence has tokens computed (in the KV cache) and tokens it needs; each
step hands out a token budget. Running sequences that are fully prefilled decode; the budget
prefills prompts in chunks, first for sequences already holding a slot, then for new ones admitted
first come, first served while slots and pages are free.

Decodes do not draw on the budget: charging them would cut a prompt that just fits the budget into two
chunks whenever anything else is decoding, and delay its first token by a step (measured: serving 8
simultaneous 256-token prompts under a 512-token budget, the median time to first token rose from 3.3 to
4.0 s). With the mixed step (`mixed`: one model call over decodes and chunks) a step thus holds at most
the budget plus one token per slot, and a chunk cut from a longer prompt fills the budget; with separate
prefill calls it is a power of two (its own length bucket).

KV memory comes in pages from a `PagePool`. A new sequence starts from the longest prefix of its
prompt already cached and prefills only the rest. When the pool runs dry, the newest running
sequence is preempted: its pages are freed (and stay findable by prefix hash) and it goes back to
the front of the waiting queue, to be recomputed from its prompt and the outputs it already has.

With data-parallel replicas there is one pool per replica and the slots are split evenly between them
(replica r owns slots [r * max_seqs / replicas, (r + 1) * max_seqs / replicas)). A sequence lives on one
replica: a new one goes where most of its prompt is cached (or being computed), else where most pages are
free; preemption frees pages of the short replica only.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools

from jaxllm.engine.kv_pages import PagePool, page_hashes
from jaxllm.engine.sequence import Sampled, Sequence, TokenLogprob, TokenOutput
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

    def sampling(self) -> list[tuple[Sequence, int]]:
        """The sequences this step samples tokens for, with how many: one after a prompt's last chunk, and
        `decode_steps` for each decode."""
        return [(c.seq, 1) for c in self.prefills if c.last] + [(s, self.decode_steps) for s in self.decodes]


class Scheduler:
    """FCFS admission into `max_seqs` slots and the pool's pages, chunked prefill under `token_budget`,
    decode of the rest, preemption of the newest when pages run out. `pool`: one PagePool, or a list of one
    per data-parallel replica (then the replicas share the slots evenly). `mixed`: decodes and chunks run as
    one step (see the module docstring). `overlap_masks`: a constrained sequence may be planned while its last
    token is in flight (the engine then samples it only once that token is read)."""

    def __init__(
        self,
        max_seqs: int,
        token_budget: int,
        max_waiting: int | None = None,
        decode_steps: int = 1,
        pool: PagePool | list[PagePool] | None = None,
        mixed: bool = False,
        overlap_masks: bool = False,
    ):
        self.token_budget, self.max_waiting, self.decode_steps = token_budget, max_waiting, decode_steps
        self.mixed, self.overlap_masks = mixed, overlap_masks
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self.preemptions = 0
        self._order = itertools.count()
        self._to_register: list[Sequence] = []
        self.resize(max_seqs, pool or PagePool(0, 16))

    def resize(self, max_seqs: int, pool: PagePool | list[PagePool]) -> None:
        """Change the number of slots and the page pool(s) (only while nothing runs)."""
        assert not self.running, "resize() while sequences are running"
        self.pools = list(pool) if isinstance(pool, list) else [pool]
        n = len(self.pools)
        if max_seqs % n:
            raise ValueError(f"{max_seqs} slots do not split evenly over {n} replicas")
        self.max_seqs, per = max_seqs, max_seqs // n
        self._free = [list(range(r * per, (r + 1) * per)) for r in range(n)]  # each replica's free slots, a heap

    @property
    def pool(self) -> PagePool:
        """The page pool, when there is one replica."""
        if len(self.pools) != 1:
            raise ValueError(f"{len(self.pools)} replicas have a pool each: use .pools")
        return self.pools[0]

    @property
    def page_size(self) -> int:
        return self.pools[0].page_size

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

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Finish a sequence for a reason found outside the tokens (a stop string in its text) and free it."""
        if not seq.finished:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Give back a finished sequence's slot and pages."""
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free[seq.replica], seq.slot)
            self._free_pages(seq)

    @property
    def num_free_slots(self) -> int:
        return sum(map(len, self._free))

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
        # Mixed: prompts join through the mixed step (one decode step beside them), so a plan of decodes alone
        # runs them all (pages are grown for that before knowing whether chunks join).
        steps = self.decode_steps if self.mixed or not busy else 1
        decodes = []
        # A constrained sequence's next allowed tokens follow from its last token, and it takes one step at a time.
        # Its last token must be read before this step samples: either it waits for it (one step in two), or,
        # with `overlap_masks`, the engine reads it while this step's model runs and samples after.
        lag = 1 if self.overlap_masks else 0
        ready = lambda s: s.prefilled and not s.finished and s.wants_more() and not (s.matcher and s.inflight > lag)
        for s in self._by_age(ready):
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
        while self.waiting and self.num_free_slots and budget > 0:
            chunk = self._admit(budget)
            if chunk is None:
                break
            prefills.append(chunk)
            budget -= chunk.end - chunk.start
        decodes = [s for s in decodes if s.slot is not None]  # drop any preempted by a later prefill
        if (self.mixed and prefills) or any(s.matcher is not None for s in decodes):
            steps = 1
        for s in decodes:
            s.inflight += steps
        self._to_register = [c.seq for c in prefills if c.seq.slot is not None]
        return Plan(prefills, decodes, steps)

    def update(
        self,
        plan: Plan,
        sampled: dict[Sequence, Sampled],
        prompt_logprobs: dict[Sequence, dict[int, TokenLogprob]] | None = None,
    ) -> list[TokenOutput]:
        """Take back what the device computed for `plan`: the tokens sampled for each of its sampling sequences
        (`Plan.sampling`), and the prompt logprobs its chunks computed (by prompt position). Tokens are taken
        until a token condition finishes a sequence (the rest are dropped, as is everything for a sequence
        finished meanwhile); finished sequences free their slot and pages. One output per sampled sequence
        still running, its prompt logprobs handed out with its first token."""
        for s, scores in (prompt_logprobs or {}).items():
            for position, lp in scores.items():
                s.prompt_logprobs[position] = lp
        outputs = []
        for s, steps in plan.sampling():
            s.inflight -= steps
            got = sampled.get(s)
            if got is None or s.finished:
                continue
            taken, lps = [], []
            for j, token in enumerate(got.tokens):
                if s.append(token):
                    taken.append(token)
                    lps += [got.logprobs[j]] if got.logprobs is not None else []
                if s.finished:
                    break
            if s.finished:
                self.release(s)
            prompt = None
            if s.prompt_logprobs is not None and not s.prompt_logprobs_sent:
                prompt, s.prompt_logprobs_sent = s.prompt_logprobs, True
            outputs.append(TokenOutput(s, taken, lps, s.finished, prompt))
        return outputs

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
        s.hashes = page_hashes(tokens, self.page_size, salt=s.hash_salt) if self.pools[0].prefix_caching else []
        usable = (len(tokens) - 1) // self.page_size  # the last token is always computed
        if s.prompt_logprobs is not None and not s.prompt_logprobs_sent:
            usable = 0  # its prompt logprobs come from computing every position: no cached prefix
        s.replica, cached, pending = self._place(s.hashes, usable)
        if pending:
            return None  # a running sequence is computing the next pages of this prefix: wait for them
        pool = self.pools[s.replica]
        s.pages = pool.match_prefix(s.hashes, usable)
        s.num_computed = len(s.pages) * self.page_size
        chunk = self._chunk(s, budget, preempt=False)
        if chunk is None:
            pool.free(s.pages)
            s.pages, s.num_computed = [], 0
            return None
        chunk.first = True
        pool.record_lookup(min(usable, len(s.hashes)), chunk.start // self.page_size)
        if not s.preemptions:
            s.cached_tokens = chunk.start
        self.waiting.popleft()
        s.slot = heapq.heappop(self._free[s.replica])
        s.order = next(self._order)
        self.running[s.slot] = s
        return chunk

    def _place(self, hashes: list[bytes], usable: int) -> tuple[int, int, bool]:
        """(replica, cached pages there, whether its next page is being computed there) for a new sequence:
        among replicas with a free slot, the one holding most of its prefix, then one computing the next page
        of it, then the one with most free pages."""
        best = None
        for r, pool in enumerate(self.pools):
            if not self._free[r]:
                continue
            cached = pool.cached_prefix(hashes, usable)
            pending = cached < min(usable, len(hashes)) and hashes[cached] in self._pending_hashes(r)
            key = (cached, pending, pool.num_free)
            if best is None or key > best[0]:
                best = (key, r)
        (cached, pending, _), r = best
        return r, cached, pending

    def _chunk(self, s: Sequence, budget: int, preempt: bool) -> PrefillChunk | None:
        """The next chunk of s: all of the rest if it fits the budget, else as much as fits (mixed) or a power
        of two within it; None when its pages cannot be had (after preempting newer sequences, if allowed)."""
        rest = s.prefill_len - s.num_computed
        size = rest if rest <= budget or self.mixed else 1 << (budget.bit_length() - 1)
        size = min(size, budget)
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
        pool = self.pools[s.replica]
        need = pool.pages_for(tokens) - len(s.pages)
        if need <= 0:
            return True
        got = pool.allocate(need)
        if got is None:
            return False
        s.pages += got
        return True

    def _grow(self, s: Sequence, tokens: int) -> bool:
        """Like _extend, preempting the newest running sequences of its replica while pages are short; False
        when s itself had to go."""
        while not self._extend(s, tokens):
            victim = max((r for r in self.running.values() if r.replica == s.replica), key=lambda r: r.order)
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _preempt(self, s: Sequence) -> None:
        del self.running[s.slot]
        heapq.heappush(self._free[s.replica], s.slot)
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
        self.pools[s.replica].free(s.pages)
        s.pages, s.registered = [], 0
        if s in self._to_register:
            self._to_register.remove(s)

    def _register(self, s: Sequence, written: int) -> None:
        """Make s's full pages among its first `written` positions findable by prefix hash."""
        pool = self.pools[s.replica]
        if pool.prefix_caching and s.pages:
            n = written // self.page_size
            if len(s.hashes) < n:
                s.hashes = page_hashes(s.token_ids()[:written], self.page_size, s.hashes, s.hash_salt)
            pool.register(s.pages[:n], s.hashes[:n])
            s.registered = max(s.registered, n)

    def _pending_hashes(self, replica: int) -> set[bytes]:
        """Prefix hashes of pages that running sequences of `replica` will have written soon but are not
        findable yet."""
        return {h for s in self.running.values() if s.replica == replica for h in s.hashes[s.registered :]}
