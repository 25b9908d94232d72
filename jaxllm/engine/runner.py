"""Compiled prefill and decode steps over a KV cache: all device work lives here.

The runner owns the params, the cache and the per-slot decode state, all on device. Each step
function is jitted once per bucket and donates the cache and state, so they are updated in place.
Decode runs several steps per dispatch under `lax.scan` and returns device arrays that the caller
reads later, after the next step is already dispatched.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.kv_cache import KVCache, bytes_per_token
from jaxllm.engine.sampling import RowParams, SamplerFlags, sample, token_logprobs
from jaxllm.errors import InvalidRequestError
from jaxllm.kernels import Ragged
from jaxllm.lora.slots import NO_ADAPTER, LoraSlots
from jaxllm.models.registry import forward
from jaxllm.sharding import Placement, placed


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-slot state carried between steps: tokens/positions/steps [slots]; the rest [slots, vocab]."""

    tokens: jax.Array
    positions: jax.Array
    steps: jax.Array
    prompt_mask: jax.Array
    counts: jax.Array
    bias: jax.Array

    @classmethod
    def zeros(cls, slots: int, vocab: int) -> DecodeState:
        z = lambda: jnp.zeros((slots,), jnp.int32)  # distinct buffers: each is donated on its own
        return cls(
            z(),
            z(),
            z(),
            jnp.zeros((slots, vocab), bool),
            jnp.zeros((slots, vocab), jnp.int32),
            jnp.zeros((slots, vocab), jnp.float32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillBatch:
    """Host-side inputs of one prefill: tokens [rows, T] padded; starts (tokens already cached), lengths
    (tokens in this chunk), slots (decode-state rows, of the row's replica), prompt_lens (prompt part of
    each row's tokens: the rest are earlier outputs being recomputed) and out_steps (outputs generated
    before) [rows];
    fresh [rows]: the row's first chunk since admission (its penalty state starts afresh, from `prior`,
    the tokens [0, start) found in the prefix cache, [rows, ctx_len], `vocab` past them); last [rows]:
    the row's last chunk (its sampled token counts); block_tables [rows, n_pages] (page ids of the row's
    replica: with data-parallel replicas the rows come grouped by replica, rows / replicas each); row params; bias
    [rows, V]; ctx_len: static cached prefix bucket the chunk attends to (0 when nothing is cached); flags:
    the sampler variant (static). A pytree of plain arrays: the jitted prefill takes it whole, compiled once
    per static fields and array shapes."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    slots: np.ndarray
    prompt_lens: np.ndarray
    out_steps: np.ndarray
    fresh: np.ndarray
    last: np.ndarray
    prior: np.ndarray
    block_tables: np.ndarray
    params: RowParams
    bias: np.ndarray
    ctx_len: int = dataclasses.field(default=0, metadata=dict(static=True))
    flags: SamplerFlags = dataclasses.field(default=SamplerFlags(), metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeBatch:
    """Host-side inputs of one decode dispatch over the first `rows` slots (with data-parallel replicas, the
    first rows / replicas slots of each replica, replica by replica): params (RowParams [rows]);
    active [rows] (the rows whose state advances: the others are padding); block_tables [rows, n_pages]
    covering every position written; rows, attn_len (the static context bucket attended), n_steps (decode
    steps in the dispatch) and flags (the sampler variant), all static. Plain arrays, like PrefillBatch."""

    params: RowParams
    active: np.ndarray
    block_tables: np.ndarray
    rows: int = dataclasses.field(metadata=dict(static=True))
    attn_len: int = dataclasses.field(metadata=dict(static=True))
    n_steps: int = dataclasses.field(metadata=dict(static=True))
    flags: SamplerFlags = dataclasses.field(default=SamplerFlags(), metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MixedBatch:
    """Host-side inputs of one mixed step: decodes and prefill chunks as one flat run of tokens.

    Per token [tokens]: tokens (a chunk's token ids), positions, seq_ids (its sequence's row; padding: out
    of range). Per sequence [seqs]: decoding (a decode: its one token, position and cached length are its
    slot's, on device, and the host's entries are ignored), q_starts, q_lens (its tokens in the run), ctx_lens
    (positions already cached), slots, prompt_lens (positions below are the prompt, the rest outputs being
    recomputed), fresh (its first chunk since admission: penalty state starts from `prior` [seqs, ctx_len],
    the prefix-cache tokens, `vocab` past them),
    sample (due a token: a decode or a last chunk), out_steps (outputs generated before, for chunks; a
    decode's come from its slot), block_tables [seqs, n_pages], params (RowParams), bias [seqs, V] (chunks;
    a decode keeps its slot's). The variant without penalties takes neither bias nor prior ([seqs, 0]) and keeps
    no penalty state. targets [tokens] (the scoring variant; [0] otherwise): the prompt token each token's
    logits predict, whose logprob is asked for (out of range: none). Static: ctx_len (the context width
    attended), flags (sampler variant).
    With data-parallel replicas the run comes in equal parts, one per replica (its tokens and sequences, with
    page ids of its pool); seq_ids, q_starts and slots index the whole run and all slots.
    """

    tokens: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    decoding: np.ndarray
    q_starts: np.ndarray
    q_lens: np.ndarray
    ctx_lens: np.ndarray
    slots: np.ndarray
    prompt_lens: np.ndarray
    fresh: np.ndarray
    sample: np.ndarray
    out_steps: np.ndarray
    prior: np.ndarray
    block_tables: np.ndarray
    params: RowParams
    bias: np.ndarray
    targets: np.ndarray
    ctx_len: int = dataclasses.field(metadata=dict(static=True))
    flags: SamplerFlags = dataclasses.field(default=SamplerFlags(), metadata=dict(static=True))


@dataclasses.dataclass
class StepInputs:
    """Everything one engine step hands the runner: its prefill calls and its decode dispatch, as plain
    data (no sequence, no tokenizer), so that it can be recorded, sent to other processes and replayed."""

    prefills: list[PrefillBatch]
    decode: DecodeBatch | None
    mixed: MixedBatch | None = None


class ModelRunner:
    """Runs the model: `prefill` new sequences into slots, `decode` every active slot some steps.

    The KV cache is a pool of pages (`KVCache`); which pages a row uses comes with each call as
    block tables. Slots index the per-sequence decode state only.
    """

    def __init__(
        self,
        model,
        params,
        cfg,
        dtype=jnp.float32,
        decode_steps: int = 4,
        max_prefill_tokens: int = 4096,
        placement: Placement | None = None,
    ):
        self.model, self.params, self.cfg, self.dtype = model, params, cfg, dtype
        self.lora: LoraSlots | None = None  # adapters served per row (`use_lora`)
        self.placement = placement
        self.channel = None  # set on the leader of a multi-process group: each call is published first
        self.decode_steps = decode_steps
        self.max_prefill_tokens = max_prefill_tokens
        self.cache: KVCache | None = None
        self.state: DecodeState | None = None
        self.slots = 0
        self.compiles: Counter = Counter()
        self.stop_mask = np.zeros((cfg.vocab_size,), bool)  # host data: every process of a group passes the same
        self.stop_mask[list(cfg.eos_token_ids)] = True
        self._prefill = self._decode = self._mixed = None  # compiled for the cache and state `allocate` makes

    @property
    def data_parallel(self) -> int:
        """Replicas: each holds slots / replicas decode-state slots and num_pages / replicas KV pages."""
        return self.placement.data_parallel if self.placement is not None else 1

    @property
    def num_pages(self) -> int:
        return 0 if self.cache is None else self.cache.num_pages

    @property
    def pages_per_replica(self) -> int:
        """A replica's pool: block tables hold ids in [0, pages_per_replica), and that id means "no page"."""
        return self.num_pages // self.data_parallel

    @property
    def slots_per_replica(self) -> int:
        return self.slots // self.data_parallel

    @property
    def page_size(self) -> int:
        return 0 if self.cache is None else self.cache.page_size

    def allocate(self, slots: int, num_pages: int, page_size: int):
        """(Re)allocate the page pool and the decode state of `slots` sequences (only valid while idle); with
        data-parallel replicas both are split between them (slots and num_pages multiples of the replicas)."""
        if slots % self.data_parallel or num_pages % self.data_parallel:
            raise ValueError(f"{slots} slots and {num_pages} pages do not split over {self.data_parallel} replicas")
        if self.cache is not None and (self.slots, self.num_pages, self.page_size) == (slots, num_pages, page_size):
            return
        if self.channel is not None:
            self.channel.send("allocate", slots, num_pages, page_size)
        self.cache = self.state = None  # free the old buffers before allocating the new ones
        per_layer = not self.model.scan_layers
        self.cache = KVCache.zeros(self.cfg, num_pages, page_size, self.dtype, per_layer, self.placement)
        self.state = DecodeState.zeros(slots, self.cfg.vocab_size)
        if self.placement is not None:  # each replica its slots, whole on each of its devices
            self.state = jax.device_put(self.state, self.placement.sharding(("batch",)))
        self.slots = slots
        self._prefill, self._decode = self._jit(self._prefill_fn), self._jit(self._decode_fn)
        self._mixed = self._jit(self._mixed_fn)
        self._halves = {
            "decode": (self._jit_forward(self._decode_forward_fn, 1), self._jit_sample(self._decode_sample_fn)),
            "mixed": (self._jit_forward(self._mixed_forward_half, 2), self._jit_sample(self._mixed_sample_half)),
        }
        self._logits = None  # the first half's logits, until the second half samples from them
        self._model_halves: dict = {}  # model halves compiled ahead of time: their logits' shape, by model shape

    def _jit(self, step):
        """A step jitted with the cache and state donated; under a placement with explicit out shardings: the
        cache and state keep theirs (so they are updated in place), the sampled tokens and logprobs are whole
        on every device (each process of a group can read them)."""
        if self.placement is None:
            return jax.jit(step, donate_argnums=(1, 2))
        keep = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
        everywhere = self.placement.replicated()
        return jax.jit(
            step, donate_argnums=(1, 2), out_shardings=(keep(self.cache), keep(self.state), everywhere, everywhere)
        )

    def _jit_forward(self, half, outputs: int):
        """The first half of a step (the model: cache donated) jitted; its other `outputs` (logits, scores) are
        whole on every device."""
        if self.placement is None:
            return jax.jit(half, donate_argnums=(1,))
        cache = jax.tree.map(lambda a: a.sharding, self.cache)
        everywhere = self.placement.replicated()
        return jax.jit(half, donate_argnums=(1,), out_shardings=(cache, *[everywhere] * outputs))

    def _jit_sample(self, half):
        """The second half of a step (sampling: the state donated) jitted like `_jit`."""
        if self.placement is None:
            return jax.jit(half, donate_argnums=(0,))
        state = jax.tree.map(lambda a: a.sharding, self.state)
        everywhere = self.placement.replicated()
        return jax.jit(half, donate_argnums=(0,), out_shardings=(state, everywhere, everywhere))

    def use_lora(self, slots: LoraSlots) -> None:
        """Serve LoRA adapters from `slots`: each row's `RowParams.lora` picks its slot. The steps compile once
        more with the adapters' arrays among their inputs; installing adapters later changes values only."""
        if self.channel is not None:
            raise InvalidRequestError(
                "LoRA adapters are not served by a group of processes yet: serve them from one process"
            )
        self.lora = slots

    def _inputs(self):
        """The model's variables: the params, and the adapter slots' arrays as the 'lora' collection."""
        return (
            self.params if self.lora is None else {**self.params, "lora": self.lora.variables(self.model.scan_layers)}
        )

    def kv_bytes_per_token(self) -> int:
        return bytes_per_token(self.cfg, self.dtype)

    def free_device_memory(self) -> int | None:
        """Bytes the devices can still allocate, where they report it (GPU/TPU): under a placement, the first
        device's free bytes times the devices of the mesh (the cache spreads evenly over them); None on the CPU."""
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if not stats or "bytes_limit" not in stats:
            return None
        devices = self.placement.mesh.size if self.placement is not None else 1
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * devices

    def prefill_rows(self, length_bucket: int) -> int:
        """How many prompts of this length bucket one prefill call may take per replica."""
        return max(1, min(self.slots_per_replica, self.max_prefill_tokens // length_bucket))

    def prefill(self, batch: PrefillBatch):
        """Prefill chunks into their pages and sample a token after each (device arrays; only a sequence's
        last chunk's token is meaningful)."""
        if self.channel is not None:
            self.channel.send("prefill", batch)
        with placed(self.placement):
            self.cache, self.state, first, info = self._prefill(
                self._inputs(), self.cache, self.state, batch, self.stop_mask
            )
        return first, info

    def decode(self, batch: DecodeBatch):
        """Dispatch `batch.n_steps` decode steps over the first `batch.rows` slots; returns device arrays
        (tokens [steps, rows], logprob info) without waiting for them."""
        if self.channel is not None:
            self.channel.send("decode", batch)
        with placed(self.placement):
            self.cache, self.state, toks, info = self._decode(
                self._inputs(), self.cache, self.state, batch, self.stop_mask
            )
        return toks, info

    def compile(self, kind: str, batch):
        """Compile the `kind` step ('prefill', 'decode' or 'mixed') for this batch's shapes ahead of time,
        without running it: a later call with the same shapes runs the compiled executable at once."""
        if self.channel is not None:
            self.channel.send("compile", kind, batch)
        step = {"prefill": self._prefill, "decode": self._decode, "mixed": self._mixed}[kind]
        with placed(self.placement):
            step.lower(self._inputs(), self.cache, self.state, batch, self.stop_mask).compile()

    def mixed(self, batch: MixedBatch):
        """Run decodes and prefill chunks as one model call (weights read once) and sample a token for each
        sequence due one; returns device arrays without waiting for them: tokens [seqs], and (the sampled
        tokens' logprob info or None, the scoring variant's `token_logprobs` of each token's target or None)."""
        if self.channel is not None:
            self.channel.send("mixed", batch)
        with placed(self.placement):
            self.cache, self.state, toks, info = self._mixed(
                self._inputs(), self.cache, self.state, batch, self.stop_mask
            )
        return toks, info

    def forward_half(self, kind: str, batch) -> None:
        """Dispatch the model of a one-step 'decode' or 'mixed' batch without sampling: its logits stay on the
        device until `sample_half` samples from them, with the batch's row params then (the host fills in the
        grammar bitmasks meanwhile, from tokens it reads back while the model runs)."""
        if self.channel is not None:
            self.channel.send("forward_half", kind, batch)
        with placed(self.placement):
            self.cache, *self._logits = self._halves[kind][0](
                self._inputs(), self.cache, self.state, _model_only(batch)
            )

    def sample_half(self, kind: str, batch):
        """Sample from the logits `forward_half` left, for the same batch with its final row params; returns
        what `decode` or `mixed` would have (device arrays, not waited for)."""
        if self.channel is not None:
            self.channel.send("sample_half", kind, batch)
        logits, *scores = self._logits
        self._logits = None
        with placed(self.placement):
            self.state, toks, info = self._halves[kind][1](self.state, logits, batch, self.stop_mask)
        return (toks, (info, scores[0])) if kind == "mixed" else (toks, info)

    def compile_halves(self, kind: str, batch) -> None:
        """Compile both halves of a one-step 'decode' or 'mixed' batch ahead of time (see `compile`); the model
        half once per model shape (batches differing only in their sampler share it)."""
        if self.channel is not None:
            self.channel.send("compile_halves", kind, batch)
        model, sample = self._halves[kind]
        inputs = _model_only(batch)
        leaves, tree = jax.tree_util.tree_flatten(inputs)
        key = (kind, str(tree), tuple((x.shape, str(x.dtype)) for x in leaves))
        with placed(self.placement):
            if key not in self._model_halves:
                lowered = model.lower(self._inputs(), self.cache, self.state, inputs)
                lowered.compile()
                spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                self._model_halves[key] = jax.tree.map(spec, lowered.out_info[1])
            sample.lower(self.state, self._model_halves[key], batch, self.stop_mask).compile()

    def _mixed_fn(self, params, cache, state, batch: MixedBatch, stop_mask):
        self.compiles["mixed"] += 1
        cache, logits, scores = self._mixed_forward_fn(params, cache, state, batch)
        state, tok, info = self._mixed_sample_fn(state, logits, batch, stop_mask)
        return cache, state, tok, (info, scores)

    def _mixed_forward_half(self, params, cache, state, batch: MixedBatch):
        self.compiles["mixed_forward"] += 1
        return self._mixed_forward_fn(params, cache, state, batch)

    def _mixed_sample_half(self, state, logits, batch: MixedBatch, stop_mask):
        self.compiles["mixed_sample"] += 1
        return self._mixed_sample_fn(state, logits, batch, stop_mask)

    def _mixed_run(self, state, batch: MixedBatch):
        """Per sequence: its slot (clipped); per token: its sequence (clipped), whether it is real and a decode,
        its token and position; per sequence: its cached length. A decode feeds the token its slot sampled last,
        at the slot's position (the host has not read them)."""
        n_seqs = batch.slots.shape[0]
        slot = jnp.minimum(batch.slots, self.slots - 1)
        seq = jnp.clip(batch.seq_ids, 0, n_seqs - 1)
        real = batch.seq_ids < n_seqs
        decode = batch.decoding[seq] & real
        tokens = jnp.where(decode, state.tokens[slot[seq]], batch.tokens)
        positions = jnp.where(decode, state.positions[slot[seq]], batch.positions)
        ctx_lens = jnp.where(batch.decoding, state.positions[slot], batch.ctx_lens)
        return slot, seq, real, decode, tokens, positions, ctx_lens

    def _mixed_forward_fn(self, params, cache, state, batch: MixedBatch):
        """The model over the run: (cache, logits [seqs, V] at each sequence's last token, scores)."""
        slot, seq, real, decode, tokens, positions, ctx_lens = self._mixed_run(state, batch)
        ragged = Ragged(batch.q_starts, batch.q_lens, batch.seq_ids, batch.tokens.shape[0])
        last = jnp.maximum(batch.q_starts + batch.q_lens - 1, 0)
        scoring = batch.targets.shape[0] > 0  # the scoring variant: logits of every token, not only the last ones
        logits, cache = forward(
            self.model,
            params,
            tokens[None],
            positions[None],
            cache,
            batch.block_tables,
            ctx_lens,
            batch.ctx_len,
            logits_index=jnp.arange(batch.tokens.shape[0]) if scoring else last,
            ragged=ragged,
            lora_ids=jnp.where(real, batch.params.lora[seq], NO_ADAPTER)[None],
        )
        scores = token_logprobs(logits, batch.targets) if scoring else None
        return cache, (logits[last] if scoring else logits), scores

    def _mixed_sample_fn(self, state, logits, batch: MixedBatch, stop_mask):
        """A token for each sequence due one from its logits [seqs, V] (the bitmask applied here), and the
        decode state advanced: (state, tokens [seqs], logprob info)."""
        n_seqs = batch.slots.shape[0]
        slot, seq, real, decode, tokens, positions, ctx_lens = self._mixed_run(state, batch)
        vocab = logits.shape[-1]
        steps = jnp.where(batch.decoding, state.steps[slot], batch.out_steps)
        to = jnp.where(batch.slots < self.slots, batch.slots, self.slots)  # padding sequences write nowhere
        due = jnp.where(batch.sample, to, self.slots)
        put = lambda dst, src, where=to: dst.at[where].set(src, mode="drop")
        if batch.flags.penalties:
            # Penalty state: a decode (and a later chunk) carries its slot's; a first chunk starts from the
            # prefix-cache tokens. A chunk's own tokens count too (a decode's token was counted when sampled).
            carried = ~batch.fresh[:, None]
            rows = jnp.arange(n_seqs)[:, None]
            prior_in_prompt = jnp.arange(batch.prior.shape[1])[None] < batch.prompt_lens[:, None]
            prompt_mask = jnp.where(carried, state.prompt_mask[slot], False)
            counts = jnp.where(carried, state.counts[slot], 0)

            def add_prior(mc):  # only a first chunk after a prefix-cache hit has prior tokens
                m, c = mc
                m = m.at[rows, jnp.where(prior_in_prompt, batch.prior, vocab)].set(True, mode="drop")
                return m, c.at[rows, jnp.where(prior_in_prompt, vocab, batch.prior)].add(1, mode="drop")

            has_prior = jnp.any(batch.fresh & (batch.ctx_lens > 0) & ~batch.decoding)
            prompt_mask, counts = jax.lax.cond(has_prior, add_prior, lambda mc: mc, (prompt_mask, counts))
            chunk_token = real & ~decode
            in_prompt = positions < batch.prompt_lens[seq]
            at = lambda keep: jnp.where(keep, tokens, vocab)
            prompt_mask = prompt_mask.at[seq, at(chunk_token & in_prompt)].set(True, mode="drop")
            counts = counts.at[seq, at(chunk_token & ~in_prompt)].add(1, mode="drop")
            bias = jnp.where(batch.decoding[:, None], state.bias[slot], batch.bias)
            tok, info = sample(
                logits,
                batch.params,
                steps,
                batch.flags,
                prompt_mask=prompt_mask,
                counts=counts,
                bias=bias,
                stop_mask=stop_mask,
            )
            counts = counts.at[jnp.arange(n_seqs), tok].add(batch.sample.astype(jnp.int32))
            kept = dict(
                prompt_mask=put(state.prompt_mask, prompt_mask),
                counts=put(state.counts, counts),
                bias=put(state.bias, bias),
            )
        else:  # no row has penalties: their state is never read, so it is not kept
            tok, info = sample(logits, batch.params, steps, batch.flags, stop_mask=stop_mask)
            kept = {}
        state = dataclasses.replace(
            state,
            tokens=put(state.tokens, tok, due),
            positions=put(state.positions, ctx_lens + batch.q_lens, due),
            steps=put(state.steps, steps + 1, due),
            **kept,
        )
        return state, tok, info

    def _prefill_fn(self, params, cache, state, batch: PrefillBatch, stop_mask):
        self.compiles["prefill"] += 1
        flags = batch.flags
        rows, t = batch.tokens.shape
        offsets = jnp.arange(t, dtype=jnp.int32)[None]
        positions = batch.starts[:, None] + offsets
        logits, cache = forward(
            self.model,
            params,
            batch.tokens,
            positions,
            cache,
            batch.block_tables,
            batch.starts,
            batch.ctx_len,
            logits_index=batch.lengths - 1,
            lora_ids=jnp.broadcast_to(batch.params.lora[:, None], batch.tokens.shape),
        )
        vocab = logits.shape[-1]
        valid = offsets < batch.lengths[:, None]
        in_prompt = valid & (positions < batch.prompt_lens[:, None])
        in_output = valid & ~in_prompt
        row_ix = jnp.arange(rows)[:, None]
        # The prompt mask and output counts of a chunked sequence accumulate over its chunks; its first
        # chunk starts them afresh from the tokens it found in the prefix cache.
        prev = jnp.minimum(batch.slots, self.slots_per_replica - 1)
        carried = ~batch.fresh[:, None]
        prior_in_prompt = jnp.arange(batch.prior.shape[1])[None] < batch.prompt_lens[:, None]
        prompt_mask = jnp.where(carried, self._read_slots(state.prompt_mask, prev), False)
        prompt_mask = prompt_mask.at[row_ix, jnp.where(prior_in_prompt, batch.prior, vocab)].set(True, mode="drop")
        prompt_mask = prompt_mask.at[row_ix, jnp.where(in_prompt, batch.tokens, vocab)].set(True, mode="drop")
        counts = jnp.where(carried, self._read_slots(state.counts, prev), 0)
        counts = counts.at[row_ix, jnp.where(prior_in_prompt, vocab, batch.prior)].add(1, mode="drop")
        counts = counts.at[row_ix, jnp.where(in_output, batch.tokens, vocab)].add(1, mode="drop")
        first, info = sample(
            logits,
            batch.params,
            batch.out_steps,
            flags,
            prompt_mask=prompt_mask,
            counts=counts,
            bias=batch.bias,
            stop_mask=stop_mask,
        )
        counts = counts.at[jnp.arange(rows), first].add(batch.last.astype(jnp.int32))  # earlier chunks sample nothing
        put = lambda dst, src: self._write_slots(dst, batch.slots, src)
        state = DecodeState(
            put(state.tokens, first),
            put(state.positions, batch.starts + batch.lengths),
            put(state.steps, batch.out_steps + 1),
            put(state.prompt_mask, prompt_mask),
            put(state.counts, counts),
            put(state.bias, batch.bias),
        )
        return cache, state, first, info

    def _decode_fn(self, params, cache, state, batch: DecodeBatch, stop_mask):
        self.compiles["decode"] += 1
        st = jax.tree.map(lambda x: self._take_rows(x, batch.rows), state)

        def step(carry, _):
            cache, st = carry
            logits, cache = self._decode_logits(params, cache, st, batch)
            st, tok, info = self._decode_advance(st, logits, batch, stop_mask)
            return (cache, st), (tok, info)

        (cache, st), (toks, info) = jax.lax.scan(step, (cache, st), None, length=batch.n_steps)
        state = jax.tree.map(self._put_rows, state, st)
        return cache, state, toks, info

    def _decode_logits(self, params, cache, st, batch: DecodeBatch):
        """One decode step's logits [rows, V] for the decode rows' state `st`, and the cache with their keys
        and values written."""
        logits, cache = forward(
            self.model,
            params,
            st.tokens[:, None],
            st.positions[:, None],
            cache,
            batch.block_tables,
            st.positions,
            batch.attn_len,
            lora_ids=batch.params.lora[:, None],
        )
        return logits[:, 0], cache

    def _decode_advance(self, st, logits, batch: DecodeBatch, stop_mask):
        """Sample each row's token from its logits [rows, V] and advance the active rows' state."""
        rp, active, flags, rows = batch.params, batch.active, batch.flags, batch.rows
        tok, info = sample(
            logits,
            rp,
            st.steps,
            flags,
            prompt_mask=st.prompt_mask,
            counts=st.counts,
            bias=st.bias,
            stop_mask=stop_mask,
        )
        inc = active.astype(jnp.int32)
        counts = st.counts.at[jnp.arange(rows), tok].add(inc) if flags.penalties else st.counts
        st = dataclasses.replace(
            st,
            tokens=jnp.where(active, tok, st.tokens),
            positions=st.positions + inc,
            steps=st.steps + inc,
            counts=counts,
        )
        return st, tok, info

    def _decode_forward_fn(self, params, cache, state, batch: DecodeBatch):
        """The first half of a one-step decode: (cache, logits [rows, V]); the state is left as it is."""
        self.compiles["decode_forward"] += 1
        st = jax.tree.map(lambda x: self._take_rows(x, batch.rows), state)
        logits, cache = self._decode_logits(params, cache, st, batch)
        return cache, logits

    def _decode_sample_fn(self, state, logits, batch: DecodeBatch, stop_mask):
        """The second half: (state, tokens [1, rows], logprob info [1, rows, ...]) as `_decode_fn` gives them."""
        self.compiles["decode_sample"] += 1
        st = jax.tree.map(lambda x: self._take_rows(x, batch.rows), state)
        st, tok, info = self._decode_advance(st, logits, batch, stop_mask)
        state = jax.tree.map(self._put_rows, state, st)
        return state, tok[None], jax.tree.map(lambda x: x[None], info)

    def _read_slots(self, state, slots):
        """state [slots, ...] read at each row's slot of its replica: rows [rows] grouped by replica -> [rows, ...].
        A gather per replica (vmapped over them), so that each replica reads its own slots where they are."""
        dp = self.data_parallel
        grouped = state.reshape(dp, -1, *state.shape[1:])
        return jax.vmap(lambda g, i: g[i])(grouped, slots.reshape(dp, -1)).reshape(-1, *state.shape[1:])

    def _write_slots(self, state, slots, rows):
        """state [slots, ...] with rows [rows, ...] written at each row's slot of its replica (out of range:
        dropped), replica by replica like `_read_slots`."""
        dp, rest = self.data_parallel, state.shape[1:]
        put = lambda g, i, r: g.at[i].set(r, mode="drop")
        grouped = jax.vmap(put)(state.reshape(dp, -1, *rest), slots.reshape(dp, -1), rows.reshape(dp, -1, *rest))
        return grouped.reshape(state.shape)

    def _take_rows(self, x, rows: int):
        """The decode rows of a state array [slots, ...]: the first rows / replicas slots of each replica."""
        dp = self.data_parallel
        return x.reshape(dp, self.slots_per_replica, *x.shape[1:])[:, : rows // dp].reshape(rows, *x.shape[1:])

    def _put_rows(self, full, part):
        """`full` [slots, ...] with the decode rows `part` [rows, ...] written back (see `_take_rows`)."""
        dp, rest = self.data_parallel, full.shape[1:]
        grouped = full.reshape(dp, self.slots_per_replica, *rest)
        return grouped.at[:, : part.shape[0] // dp].set(part.reshape(dp, -1, *rest)).reshape(full.shape)


def _model_only(batch):
    """The batch as the model half sees it: what only sampling reads (sampler variant, bitmask, penalty inputs)
    emptied, so that one compiled model half serves every sampler variant of a shape."""
    params = dataclasses.replace(batch.params, bitmask=np.zeros((batch.params.bitmask.shape[0], 0), np.int32))
    batch = dataclasses.replace(batch, params=params, flags=SamplerFlags())
    if isinstance(batch, MixedBatch):
        empty = lambda x: np.zeros((x.shape[0], 0), x.dtype)
        batch = dataclasses.replace(batch, prior=empty(batch.prior), bias=empty(batch.bias))
    return batch


def row_params(plist, seeds, rows: int, adapters=(), bitmask: np.ndarray | None = None) -> RowParams:
    """Pack per-row SamplingParams (None for an empty row), seeds, LoRA adapter slots (none by default) and the
    allowed-token bitmask of constrained rows ([rows, words], or None) into RowParams arrays [rows]."""

    def col(attr, default, dtype):
        return np.array(
            [getattr(p, attr) if p is not None else default for p in plist] + [default] * (rows - len(plist)), dtype
        )

    return RowParams(
        temperature=col("temperature", 0.0, np.float32),
        top_k=col("top_k", 0, np.int32),
        top_p=col("top_p", 1.0, np.float32),
        min_p=col("min_p", 0.0, np.float32),
        repetition_penalty=col("repetition_penalty", 1.0, np.float32),
        presence_penalty=col("presence_penalty", 0.0, np.float32),
        frequency_penalty=col("frequency_penalty", 0.0, np.float32),
        min_tokens=col("min_tokens", 0, np.int32),
        seed=np.array(list(seeds) + [0] * (rows - len(seeds)), np.uint32),
        logprobs=np.array([p is not None and p.logprobs is not None for p in plist] + [False] * (rows - len(plist))),
        lora=np.array(list(adapters) + [NO_ADAPTER] * (rows - len(adapters)), np.int32),
        bitmask=np.zeros((rows, 0), np.int32) if bitmask is None else bitmask,
    )


def two_variants(plist) -> SamplerFlags:
    """Plain greedy (no penalties, min_tokens or logprobs) or `SamplerFlags.every()`: two compiled sampler
    variants in all, the rest decided on device. Measured on SmolLM2 (CPU), `every` decodes greedy rows
    4% slower at batch 1 and 9% at batch 32 than their own variant, and sampled rows 5-10%: the plain
    greedy variant is worth its compile, the other 30 are not."""
    return SamplerFlags.every() if any(dataclasses.astuple(flags_for(plist))) else SamplerFlags()


def flags_for(plist) -> SamplerFlags:
    """The cheapest compiled sampler variant that serves every row in `plist`."""
    ps = [p for p in plist if p is not None]
    return SamplerFlags(
        sample=any(p.temperature > 0 for p in ps),
        filters=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in ps),
        penalties=any(
            p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty or p.logit_bias for p in ps
        ),
        min_tokens=any(p.min_tokens > 0 for p in ps),
        logprobs=any(p.logprobs is not None for p in ps),
    )
