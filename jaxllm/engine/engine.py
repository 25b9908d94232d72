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
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from jaxllm.distributed import peer_failure
from jaxllm.engine import buckets
from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.runner import (
    DecodeBatch,
    MixedBatch,
    ModelRunner,
    PrefillBatch,
    StepInputs,
    flags_for,
    row_params,
    two_variants,
)
from jaxllm.engine.sampling import SamplerFlags
from jaxllm.engine.scheduler import Plan, PrefillChunk, Scheduler
from jaxllm.engine.sequence import Sampled, Sequence, TokenLogprob, TokenOutput
from jaxllm.engine.surface import DecodeShape, MixedShape, Surface
from jaxllm.errors import ContextLengthError, InvalidRequestError, JaxLLMError
from jaxllm.kernels import reads_to_length
from jaxllm.lora.slots import NO_ADAPTER, LoraSlots
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured import GrammarCompiler
from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass
class _Dispatched:
    """Device results of one step's plan, with the sequence each row belonged to when it was dispatched."""

    plan: Plan
    prefills: list[tuple[object, object, dict[int, Sequence]]]
    decode: tuple[object, object, dict[int, Sequence]] | None
    # tokens, (logprob info, prompt scores), row -> sequence, and the scored chunks (see `_scored_chunks`)
    mixed: tuple[object, object, dict[int, Sequence], list] | None = None
    # A call dispatched as far as its logits, to be sampled once its bitmasks are known: (kind, batch, row ->
    # sequence, owners); None once sampled (see `Engine._sample_late`).
    late: tuple | None = None


DEFAULT_CPU_KV_GIB = 4.0  # KV cache budget on the CPU when none is given
GPU_KV_FRACTION = 0.9  # share of the free device memory the KV cache takes on accelerators by default


class Engine:
    """add_request / abort / step() over a ModelRunner and a Scheduler. One thread drives it.

    The KV cache is a pool of `page_size`-token pages sized by `kv_cache_memory` (GiB; default: 90% of
    the free device memory on accelerators, 4 GiB on the CPU), allocated on first use no larger than
    the work in sight needs. `prefix_caching` reuses cached pages of shared prompt prefixes. `mixed_step`
    (None: where the attention suits it) runs a step's prefill chunks and decodes as one model call.
    `overlap_masks`: a sequence under a grammar decodes every step, its next bitmask computed from the token
    read back while the model runs (the step's model and its sampling are then two dispatches); otherwise it
    waits for its token and decodes every other step.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_num_seqs: int,
        max_model_len: int,
        token_budget: int = 2048,
        max_waiting: int | None = None,
        page_size: int = 16,
        kv_cache_memory: float | None = None,
        prefix_caching: bool = True,
        mixed_step: bool | None = None,
        overlap_masks: bool = True,
    ):
        self.runner, self.tokenizer = runner, tokenizer
        self.cfg = runner.cfg
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        if page_size < 1:
            raise InvalidRequestError(f"page_size must be at least 1, got {page_size}")
        self.page_size, self.prefix_caching = page_size, prefix_caching
        self.replicas = runner.data_parallel
        # Decodes and prefill chunks as one model call, by default where a ragged kernel reads each sequence only
        # up to its length: the native one on the CPU, the Pallas one on a GPU once it passes its check there.
        if mixed_step is None:
            mixed_step = reads_to_length(ragged=True)
        self.mixed_step = mixed_step
        self.max_pages = self._page_budget(kv_cache_memory)
        if self.max_pages // self.replicas * page_size < max_model_len:
            per = " per data-parallel replica" if self.replicas > 1 else ""
            raise InvalidRequestError(
                f"the KV cache budget holds {self.max_pages // self.replicas * page_size} tokens{per}, fewer than "
                f"one sequence of max_model_len={max_model_len}: raise kv_cache_memory or lower max_model_len"
            )
        self.scheduler = Scheduler(
            0, token_budget, max_waiting, runner.decode_steps, mixed=self.mixed_step, overlap_masks=overlap_masks
        )
        self.surface = self._surface()
        self.grammars = GrammarCompiler(tokenizer, self.cfg.vocab_size, self.cfg.eos_token_ids)
        self.prefilled_tokens = 0  # prompt tokens computed so far (for tests and metrics)
        self._inflight: _Dispatched | None = None
        self._rng = np.random.default_rng()
        self._ids = itertools.count()
        # Called with each step's inputs before they run (plain data: see StepInputs), e.g. to record them.
        self.on_step: Callable[[StepInputs], None] | None = None

    # ---- requests -------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids, params: SamplingParams):
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token of text")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_model_len}: shorten it"
            )
        vocab = self.cfg.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        params.check_vocab(vocab)
        if params.structured is not None:
            self.grammars.compile(params.structured)  # a bad schema, regex or grammar: its error, before queueing
        if params.prompt_logprobs is not None and not self.mixed_step:
            raise InvalidRequestError(
                "prompt_logprobs needs the mixed step, which this engine runs without: drop --no-mixed-step "
                "(mixed_step=False)",
                param="prompt_logprobs",
            )

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, lora: str | None = None
    ) -> list[Sequence]:
        """Queue `params.n` sequences for this prompt and return them; results come through step(). lora: the
        name of an adapter added with `add_lora` that its tokens run through (None: the base model)."""
        self.check_prompt(prompt_ids, params)
        slot = self.lora_slot(lora)
        request_id = request_id or f"req-{next(self._ids)}"
        base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        seqs = [
            Sequence(
                request_id,
                i,
                prompt_ids,
                params,
                (base + 7919 * i) % 2**32,
                self.cfg.eos_token_ids,
                self.max_model_len,
            )
            for i in range(params.n)
        ]
        for s in seqs:
            s.lora = slot
            if params.structured is not None:
                s.matcher = self.grammars.matcher(params.structured)
        self.scheduler.add(seqs)
        return seqs

    # ---- LoRA adapters --------------------------------------------------------------------------
    def lora_slot(self, name: str | None) -> int:
        """The slot of the adapter called `name` (`NO_ADAPTER` for None; `InvalidRequestError` if unknown)."""
        if name is None:
            return NO_ADAPTER
        if self.runner.lora is None:
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded (loaded: none)", param="model")
        return self.runner.lora.slot(name)

    @property
    def lora_names(self) -> list[str]:
        return [] if self.runner.lora is None else list(self.runner.lora.names)

    def add_lora(self, name: str, adapter, slots: LoraSlots | None = None) -> None:
        """Serve `adapter` (a `jaxllm.lora.Adapter`) under `name` from the next step on, in the runner's
        adapter slots (`slots` sets them up the first time: `LoraSlots(cfg)` otherwise). Replacing an adapter
        that running requests use is refused."""
        if self.runner.lora is None:
            self.runner.use_lora(slots or LoraSlots(self.cfg, dtype=self.runner.dtype))
        if name in self.runner.lora.names:
            self._check_unused(name)
        self.runner.lora.install(name, adapter)
        self._forget_prefixes()

    def remove_lora(self, name: str) -> None:
        """Stop serving the adapter called `name` (refused while running requests use it)."""
        self.lora_slot(name)
        self._check_unused(name)
        self.runner.lora.remove(name)
        self._forget_prefixes()

    def _check_unused(self, name: str) -> None:
        slot = self.runner.lora.slot(name)
        busy = [*self.scheduler.waiting, *self.scheduler.running.values()]
        if any(s.lora == slot and not s.finished for s in busy):
            raise InvalidRequestError(f"LoRA adapter {name!r} is in use by running requests: wait for them to finish")

    def _forget_prefixes(self) -> None:
        """Cached pages computed under a slot's earlier adapter must not be found again (the slot's digests
        change meaning), so the prefix caches start afresh: they refill as prompts come."""
        for pool in self.scheduler.pools:
            pool.forget_cached()

    def abort(self, request_id: str) -> list[Sequence]:
        return self.scheduler.abort(request_id)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Finish a sequence for a reason in its text (the output processor found a stop string) and free it;
        its tokens still in flight are dropped when they arrive."""
        self.scheduler.finish(seq, reason, stop_reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- capacity -------------------------------------------------------------------------------
    def _page_budget(self, gib: float | None) -> int:
        """How many pages the KV cache may take (over all devices: a page is split over the tensor-parallel
        devices, and the replicas hold a share of the pages each)."""
        page_bytes = self.runner.kv_bytes_per_token() * self.page_size
        if gib is None:
            free = self.runner.free_device_memory()
            budget = GPU_KV_FRACTION * free if free is not None else DEFAULT_CPU_KV_GIB * 2**30
        elif gib <= 0:
            raise InvalidRequestError(f"kv_cache_memory must be a positive number of GiB, got {gib}")
        else:
            budget = gib * 2**30
        return int(budget // page_bytes)

    def reserve(self, slots: int, max_len: int) -> None:
        """Size the cache for `slots` sequences of `max_len` tokens, within the page budget (only while idle).

        It only grows: reallocating drops the prefix cache."""
        assert not self.scheduler.running and self._inflight is None, "reserve() while sequences are running"
        n = self.replicas  # each replica gets the same number of slots and pages
        slots = max(min(buckets.next_pow2(slots), self.max_num_seqs), self.runner.slots)
        slots = -(-slots // n) * n
        per_seq = -(-min(buckets.next_pow2(max_len, 64), self.max_model_len) // self.page_size)
        pages = max(min(slots * per_seq, self.max_pages) // n * n, self.runner.num_pages)
        if self.runner.cache is not None and (slots, pages) == (self.runner.slots, self.runner.num_pages):
            return
        self.runner.allocate(slots, pages, self.page_size)
        pools = [PagePool(pages // n, self.page_size, self.prefix_caching) for _ in range(n)]
        self.scheduler.resize(slots, pools)
        self.surface = self._surface()

    def _surface(self) -> Surface:
        """The shapes the mixed and decode steps take for the slots allocated now."""
        return Surface(
            max(self.runner.slots, self.replicas),
            self.max_model_len,
            self.scheduler.token_budget,
            self.runner.decode_steps,
            self.replicas,
            self.mixed_step,
            fixed_context=reads_to_length(ragged=True),
            fixed_decode_context=reads_to_length(ragged=False),
        )

    def warmup(self, progress: bool = False, grammar: bool = True) -> tuple[int, float]:
        """Compile every shape of the surface (the mixed steps when `mixed_step`, the decode dispatches, and with
        `grammar` the steps of rows under a grammar) ahead of time, without running them; the persistent
        compilation cache, when on, keeps them for the next start. Returns (shapes compiled, seconds)."""
        start = time.perf_counter()
        if self.runner.cache is None:
            self.reserve(self.max_num_seqs, self.max_model_len)
        surface = self.surface
        idle = [[] for _ in range(self.replicas)]
        batch_of = lambda shape: (
            ("decode", self._decode_batch(shape, {}))
            if isinstance(shape, DecodeShape)
            else ("mixed", self._mixed_batch(shape, idle)[0])
        )
        shapes = (surface.mixed_shapes() if self.mixed_step else []) + surface.decode_shapes()
        if grammar and self.scheduler.overlap_masks:
            shapes += surface.grammar_shapes()
        for shape in tqdm(shapes, desc="Compiling steps", unit="shape", disable=not progress):
            kind, batch = batch_of(shape)
            if shape.grammar:
                self.runner.compile_halves(kind, batch)
            else:
                self.runner.compile(kind, batch)
        return len(shapes), time.perf_counter() - start

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        """Dispatch the next plan, then read back the previous step's tokens and hand them to the scheduler;
        returns what each sequence took (text is the output processor's)."""
        try:
            if self.runner.cache is None:
                self.reserve(self.max_num_seqs, self.max_model_len)
            plan = self.scheduler.schedule()
            late = self._late_masks(plan)
            current = self._dispatch(plan, late) if not plan.empty else None
            updates = self._process(self._inflight) if self._inflight is not None else []
            if late:
                self._sample_late(current)
        except Exception as e:
            if self.runner.channel is not None and not isinstance(e, JaxLLMError):
                raise peer_failure(e) from e  # one process of a group is gone: its collectives fail
            raise
        self._inflight = current
        return updates

    def _late_masks(self, plan: Plan) -> bool:
        """Whether the plan's decode or mixed call samples rows under a grammar with `overlap_masks`: it then
        runs as a model half and a sampling half, the bitmasks computed in between, once the tokens in flight
        are read (a constrained sequence may decode while its last token is one of them)."""
        if not self.scheduler.overlap_masks:
            return False
        joined = [c.seq for c in plan.prefills if c.last] if self.mixed_step else []
        return any(s.matcher is not None for s in [*plan.decodes, *joined])

    def _dispatch(self, plan: Plan, late: bool = False) -> _Dispatched:
        """Dispatch the plan's calls; with `late`, the decode or mixed call only as far as its logits (its
        sampling follows in `_sample_late`)."""
        inputs, owners = self.step_inputs(plan, late)
        self.prefilled_tokens += sum(c.end - c.start for c in plan.prefills)
        if self.on_step is not None:
            self.on_step(inputs)
        prefills = [(*self.runner.prefill(b), seqs) for b, seqs in zip(inputs.prefills, owners[0], strict=True)]
        done = _Dispatched(plan, prefills, None, None)
        if late:
            kind, batch = ("mixed", inputs.mixed) if inputs.mixed is not None else ("decode", inputs.decode)
            self.runner.forward_half(kind, batch)
            done.late = (kind, batch, owners[2][0] if kind == "mixed" else owners[1], owners[2])
            return done
        done.decode = (*self.runner.decode(inputs.decode), owners[1]) if inputs.decode is not None else None
        done.mixed = (*self.runner.mixed(inputs.mixed), owners[2]) if inputs.mixed is not None else None
        return done

    def _sample_late(self, done: _Dispatched) -> None:
        """Sample the late call of `done` with the bitmasks of its rows now that their matchers have taken the
        tokens read meanwhile."""
        kind, batch, rows, owners = done.late
        masks = self._allowed_tokens([rows.get(i) for i in range(batch.params.bitmask.shape[0])])
        batch = dataclasses.replace(batch, params=dataclasses.replace(batch.params, bitmask=masks))
        result = self.runner.sample_half(kind, batch)
        if kind == "mixed":
            done.mixed = (*result, owners)
        else:
            done.decode = (*result, rows)
        done.late = None

    def step_inputs(self, plan: Plan, late: bool = False) -> tuple[StepInputs, tuple]:
        """The plan as the runner's plain inputs, and which sequence each sampled row belongs to (of each
        prefill call, of the decode, of the mixed step); `late`: the decode or mixed call's bitmasks left for
        later (see `_sample_late`). With `mixed_step`, a plan holding prefill chunks
        runs as one mixed step with its decodes; a plan of decodes alone runs as a (multi-step) decode."""
        if self.mixed_step and plan.prefills:
            batch, owners = self._mixed(plan, late)
            return StepInputs([], None, batch), ([], {}, owners)
        per_replica = lambda: [[] for _ in range(self.replicas)]
        groups: dict[tuple[int, int], list[list[PrefillChunk]]] = defaultdict(per_replica)
        for c in plan.prefills:
            length = buckets.seq_bucket(c.end - c.start, self.max_model_len)
            ctx = buckets.attn_bucket(c.start, self.max_model_len) if c.start else 0
            groups[(length, ctx)][c.seq.replica].append(c)
        prefills, prefill_owners = [], []
        for (length, ctx), per_replica in groups.items():
            limit = self.runner.prefill_rows(length)
            for i in range(0, max(map(len, per_replica)), limit):
                parts = [chunks[i : i + limit] for chunks in per_replica]
                rows = buckets.batch_bucket(max(map(len, parts)), limit)  # per replica
                placed = [(r * rows + j, c) for r, part in enumerate(parts) for j, c in enumerate(part)]
                prefills.append(self._prefill(placed, rows * self.replicas, length, ctx))
                prefill_owners.append({row: c.seq for row, c in placed if c.last})
        decode, decode_owners = (self._decode(plan.decodes, plan.decode_steps, late)) if plan.decodes else (None, {})
        return StepInputs(prefills, decode), (prefill_owners, decode_owners, {})

    def _block_tables(self, seqs, rows: int, tokens: int) -> np.ndarray:
        """[rows, n_pages] page ids covering `tokens` positions of each sequence (None: a padding row);
        missing pages read as the out-of-range id num_pages (writes there are dropped)."""
        width = -(-min(tokens, self.max_model_len) // self.page_size)
        table = np.full((rows, width), self.runner.pages_per_replica, np.int32)
        for i, s in enumerate(seqs):
            if s is not None:
                pages = s.pages[:width]
                table[i, : len(pages)] = pages
        return table

    def _prefill(self, placed: list[tuple[int, PrefillChunk]], rows: int, length: int, ctx: int) -> PrefillBatch:
        """A prefill call of `rows` rows, chunks at the given rows (the others are padding)."""
        tokens = np.zeros((rows, length), np.int32)
        starts = np.zeros((rows,), np.int32)
        lengths = np.ones((rows,), np.int32)
        per = self.runner.slots_per_replica
        slots = np.full((rows,), per, np.int32)  # slots of the row's replica; padding rows write nowhere
        prompt_lens = np.zeros((rows,), np.int32)
        out_steps = np.zeros((rows,), np.int32)
        fresh = np.ones((rows,), bool)
        last = np.zeros((rows,), bool)
        prior = np.full((rows, ctx), self.cfg.vocab_size, np.int32)
        bias = np.zeros((rows, self.cfg.vocab_size), np.float32)
        by_row: list[PrefillChunk | None] = [None] * rows
        for i, c in placed:
            by_row[i] = c
            s, ids = c.seq, c.seq.token_ids()
            tokens[i, : c.end - c.start] = ids[c.start : c.end]
            starts[i], lengths[i], slots[i] = c.start, c.end - c.start, s.slot % per
            prompt_lens[i], out_steps[i] = len(s.prompt_ids), s.prefill_len - len(s.prompt_ids)
            fresh[i], last[i] = c.first, c.last
            if c.first:
                prior[i, : c.start] = ids[: c.start]
            for tok, b in s.params.logit_bias.items():
                bias[i, tok] = b
        plist = [c.seq.params if c else None for c in by_row]
        seeds = [c.seq.seed if c else 0 for c in by_row]
        masks = self._allowed_tokens([c.seq if c and c.last else None for c in by_row])
        longest = max(ctx, max(c.start for _, c in placed)) + length
        table = self._block_tables([c.seq if c else None for c in by_row], rows, longest)
        batch = PrefillBatch(
            tokens,
            starts,
            lengths,
            slots,
            prompt_lens,
            out_steps,
            fresh,
            last,
            prior,
            table,
            row_params(plist, seeds, rows, [c.seq.lora if c else NO_ADAPTER for c in by_row], masks),
            bias,
            ctx,
            dataclasses.replace(flags_for(plist), grammar=masks is not None),
        )
        return batch

    def _decode(self, seqs: list[Sequence], steps: int, late: bool = False) -> tuple[DecodeBatch, dict[int, Sequence]]:
        """The decode dispatch: the first R slots of each replica (R covering its highest busy slot), replica by
        replica, so row r * R + i is slot r * slots_per_replica + i; `late`: as a grammar shape (two halves)."""
        per = self.runner.slots_per_replica
        r_rows = self.surface.rows(max(s.slot % per for s in seqs) + 1)
        by_row = {s.slot // per * r_rows + s.slot % per: s for s in seqs}
        longest = max(s.num_tokens + s.inflight for s in seqs)
        every = two_variants([s.params for s in seqs]) != SamplerFlags()
        shape = DecodeShape(r_rows * self.replicas, self.surface.context(longest, decode=True), steps, every, late)
        return self._decode_batch(shape, by_row), by_row

    def _decode_batch(self, shape: DecodeShape, by_row: dict[int, Sequence]) -> DecodeBatch:
        """A decode dispatch of this shape, sequences at the given rows (the others are padding)."""
        plist = [by_row.get(i) for i in range(shape.rows)]
        params = [s.params if s else None for s in plist]
        seeds = [s.seed if s else 0 for s in plist]
        active = np.array([s is not None for s in plist])
        table = self._block_tables(plist, shape.rows, shape.context)
        masks = self._allowed_tokens(plist, shape.grammar)
        flags = SamplerFlags.every() if shape.every else SamplerFlags()
        flags = dataclasses.replace(flags, grammar=masks is not None)
        return DecodeBatch(
            row_params(params, seeds, shape.rows, [s.lora if s else NO_ADAPTER for s in plist], masks),
            active,
            table,
            shape.rows,
            shape.context,
            shape.steps,
            flags,
        )

    def _mixed(self, plan: Plan, late: bool = False) -> tuple[MixedBatch, tuple[dict, list]]:
        """The plan's decodes (one step each) and prefill chunks as one flat run of tokens, replica by replica:
        in each, decodes first, one token each, then each chunk's tokens; padded to a shape of the surface."""
        assert plan.decode_steps == 1 or not plan.decodes, "a mixed step decodes one token per sequence"
        groups: list[list] = [[] for _ in range(self.replicas)]
        for s in plan.decodes:
            groups[s.replica].append((s, None))
        for c in plan.prefills:
            groups[c.seq.replica].append((c.seq, c))
        busiest = max(sum(1 if c is None else c.end - c.start for _, c in group) for group in groups)
        # context attended: every decode's tokens so far, every chunk's cached prefix and itself
        longest = max([s.num_tokens + s.inflight for s in plan.decodes] + [c.end for c in plan.prefills])
        surface = self.surface
        every = two_variants([s.params for group in groups for s, _ in group]) != SamplerFlags()
        seqs = surface.seqs(max(map(len, groups)))
        shape = MixedShape(surface.tokens(busiest), seqs, surface.context(longest), every)
        if any(_scores(s, c) for group in groups for s, c in group):
            shape = surface.scoring_shape(shape.tokens, shape.context)
        return self._mixed_batch(dataclasses.replace(shape, grammar=late), groups)

    def _mixed_batch(self, shape: MixedShape, groups: list[list]) -> tuple[MixedBatch, tuple[dict, list]]:
        """A mixed step of this shape over each replica's entries ((sequence, None) for a decode, (sequence,
        chunk) for a prefill chunk), and its owners: which sequence each sampled row belongs to, and the
        chunks whose prompt tokens are scored (sequence, first token in the run, chunk). Replica r's tokens and
        sequences take the r-th equal part of the run; padding sequences have no tokens and write nowhere.
        The penalty inputs (`prior`, the prefix-cache tokens, and the logit bias) come only with the variant
        that applies penalties."""
        t, n, parts = shape.tokens, shape.seqs, len(groups)
        tokens, positions = np.zeros((t,), np.int32), np.zeros((t,), np.int32)
        seq_ids = np.full((t,), n, np.int32)
        decoding, fresh, sample = np.zeros((n,), bool), np.ones((n,), bool), np.zeros((n,), bool)
        q_starts, q_lens = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        ctx_lens, prompt_lens, out_steps = np.zeros((n,), np.int32), np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        slots = np.full((n,), self.runner.slots, np.int32)  # padding sequences write nowhere
        prior = np.full((n, shape.context if shape.every else 0), self.cfg.vocab_size, np.int32)
        bias = np.zeros((n, self.cfg.vocab_size if shape.every else 0), np.float32)
        targets = np.full((t if shape.scoring else 0,), -1, np.int32)  # -1: no prompt logprob asked for
        entries: list = [None] * n
        for r, group in enumerate(groups):  # replica r: sequences from r * n / parts, tokens from r * t / parts
            first, at = r * n // parts, r * t // parts
            for i, entry in enumerate(group, start=first):
                entries[i], q_starts[i] = entry, at
                at += 1 if entry[1] is None else entry[1].end - entry[1].start
            q_starts[first + len(group) : (r + 1) * n // parts] = at  # padding sequences: none of the run
        owners, scored = {}, []
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            (s, c), at = entry, q_starts[i]
            slots[i], prompt_lens[i] = s.slot, len(s.prompt_ids)
            if c is None:  # a decode: token, position and context come from its slot on device
                decoding[i], fresh[i], sample[i], q_lens[i] = True, False, True, 1
                seq_ids[at] = i
            else:
                ids, size = s.token_ids(), c.end - c.start
                tokens[at : at + size] = ids[c.start : c.end]
                positions[at : at + size] = np.arange(c.start, c.end)
                seq_ids[at : at + size] = i
                q_lens[i], ctx_lens[i], fresh[i], sample[i] = size, c.start, c.first, c.last
                out_steps[i] = s.prefill_len - len(s.prompt_ids)
                if c.first and prior.shape[1]:
                    prior[i, : c.start] = ids[: c.start]
                for tok, b in s.params.logit_bias.items():  # a logit bias selects the variant with penalties
                    bias[i, tok] = b
                if _scores(s, c):  # each token's logits predict the next prompt token
                    ahead = min(c.end, len(s.prompt_ids) - 1) - c.start
                    targets[at : at + ahead] = s.prompt_ids[c.start + 1 : c.start + 1 + ahead]
                    scored.append((s, at, c))
            if sample[i]:
                owners[i] = s
        seqs = [e[0] if e else None for e in entries]
        plist = [s.params if s else None for s in seqs]
        table = self._block_tables(seqs, n, shape.context)
        batch = MixedBatch(
            tokens,
            positions,
            seq_ids,
            decoding,
            q_starts,
            q_lens,
            ctx_lens,
            slots,
            prompt_lens,
            fresh,
            sample,
            out_steps,
            prior,
            table,
            row_params(
                plist,
                [s.seed if s else 0 for s in seqs],
                n,
                [s.lora if s else NO_ADAPTER for s in seqs],
                masks := self._allowed_tokens([s if sample[i] else None for i, s in enumerate(seqs)], shape.grammar),
            ),
            bias,
            targets,
            shape.context,
            dataclasses.replace(SamplerFlags.every() if shape.every else SamplerFlags(), grammar=masks is not None),
        )
        return batch, (owners, scored)

    def _allowed_tokens(self, seqs, late: bool = False) -> np.ndarray | None:
        """The bitmask [rows, words] of the tokens each row may take next (every bit set for free rows and
        padding), or None when no row is constrained (the batch then compiles and runs as a free one). `late`:
        every bit set, a placeholder of its shape (the real masks come once the rows' last tokens are read)."""
        if not late and not any(s is not None and s.matcher is not None for s in seqs):
            return None
        masks = np.full((len(seqs), (self.cfg.vocab_size + 31) // 32), -1, np.int32)
        for row, s in enumerate(seqs if not late else ()):
            if s is not None and s.matcher is not None:
                s.matcher.fill(masks[row])
        return masks

    def _process(self, done: _Dispatched) -> list[TokenOutput]:
        """The device results of a dispatched plan, read back and given to `Scheduler.update`."""
        sampled: dict[Sequence, Sampled] = {}
        scores = None
        if done.mixed is not None:
            toks, (info, prompt), (seqs, scored) = done.mixed
            if scored:
                scores = _prompt_logprobs(scored, tuple(np.asarray(x) for x in prompt))
            info = None if info is None else tuple(np.asarray(x)[:, None] for x in info)
            sampled |= _sampled(np.asarray(toks)[:, None], info, seqs)
        for first, info, seqs in done.prefills:
            if seqs:
                info = None if info is None else tuple(np.asarray(x)[:, None] for x in info)
                sampled |= _sampled(np.asarray(first)[:, None], info, seqs)
        if done.decode is not None:
            toks, info, seqs = done.decode
            info = None if info is None else tuple(np.swapaxes(np.asarray(x), 0, 1) for x in info)
            sampled |= _sampled(np.asarray(toks).T, info, seqs)  # [rows, steps]
        return self.scheduler.update(done.plan, sampled, scores)


def _sampled(toks: np.ndarray, info, seqs: dict[int, Sequence]) -> dict[Sequence, Sampled]:
    """Each row's tokens and logprobs. toks [rows, steps]; info: (logprob, top ids, top logprobs) arrays
    [rows, steps, ...] or None; seqs maps row -> sequence."""
    out = {}
    for row, s in seqs.items():
        tokens = [int(t) for t in toks[row]]
        lps = None
        if s.params.logprobs is not None and info is not None:
            k = s.params.logprobs
            lps = [
                TokenLogprob(
                    t,
                    float(info[0][row, j]),
                    list(zip(info[1][row, j, :k].tolist(), info[2][row, j, :k].tolist(), strict=True)),
                )
                for j, t in enumerate(tokens)
            ]
        out[s] = Sampled(tokens, lps)
    return out


def _scores(s: Sequence, chunk) -> bool:
    """Whether this chunk of s computes logits that score prompt tokens s asked logprobs of."""
    return chunk is not None and s.prompt_logprobs is not None and chunk.start < len(s.prompt_ids) - 1


def _prompt_logprobs(scored, scores) -> dict[Sequence, dict[int, TokenLogprob]]:
    """Each scored chunk's prompt logprobs by prompt position, from the step's (logprob [tokens], top ids, top
    logprobs): the logits at position p score prompt token p + 1. A chunk computed again (after preemption)
    gives the same values."""
    lps, top_ids, top_lps = scores
    out: dict[Sequence, dict[int, TokenLogprob]] = defaultdict(dict)
    for s, at, c in scored:
        k = s.params.prompt_logprobs
        for p in range(c.start, min(c.end, len(s.prompt_ids) - 1)):
            j = at + p - c.start
            top = list(zip(top_ids[j, :k].tolist(), top_lps[j, :k].tolist(), strict=True))
            out[s][p + 1] = TokenLogprob(s.prompt_ids[p + 1], float(lps[j]), top)
    return out
