"""The compiled surface: every shape the engine's mixed and decode steps can take, enumerated in one place.

A server must not compile while users wait (on a GPU a new shape costs seconds). The engine pads each
mixed step and each decode dispatch to one of the shapes listed here, and `Engine.warmup` compiles all of
them before serving. The configuration bounds the set:

- mixed steps: token counts (powers of two from 16 up to 512, then multiples of 512, up to the token
  budget, `--max-num-batched-tokens`, then the budget plus 16, 32, ... decodes up to one per slot) × sequence counts (1,
  4, 16, 64, ... up to the slots) × the sampler variant (plain greedy, or every part chosen on device),
  and, for steps that score their prompt tokens (prompt logprobs), one shape per token count.
  With data-parallel replicas these count per replica: each replica gets an equal part of the flat run,
  sized for the busiest one;
- decode dispatches: rows (powers of two up to the slots) × steps × the sampler variant. With the mixed
  step, a dispatch of decodes alone always runs `decode_steps` (prompts join through mixed steps); with
  separate prefill calls, 1 while prompts wait;
- steps with rows under a grammar (`grammar_shapes`): each mixed shape, and each decode row count at one
  step, as a model half (compiled once per model shape: the sampler variant does not change it) and a
  sampling half that applies the bitmask (small: no model).

The attended context is one static width (the whole `max_model_len`) when the attention kernel reads each
sequence only up to its length, so the width costs nothing; otherwise it is bucketed too (powers of two
from 64), multiplying the set.
"""

from __future__ import annotations

import dataclasses

from jaxllm.engine import buckets

MIN_TOKENS = 16  # the smallest token bucket of a mixed step
TOKEN_STEP = 512  # past this, token buckets grow in steps of it (a power of two past 512 would waste up to half)
DECODE_MARGIN = 16  # the smallest room past the token budget for a mixed step's decodes
SEQ_GROWTH = 4  # sequence buckets of a mixed step grow 4x: sampling and the LM head are small beside the tokens


@dataclasses.dataclass(frozen=True)
class MixedShape:
    """A mixed step's static shape: flat tokens and sequences (over all replicas), attended context
    (positions), sampler variant, and whether it scores every token (prompt logprobs)."""

    tokens: int
    seqs: int
    context: int
    every: bool
    scoring: bool = False
    grammar: bool = False  # rows under a grammar: run as a model half and a sampling half (bitmask applied)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """A decode dispatch's static shape: rows (over all replicas), attended context, steps, sampler variant."""

    rows: int
    context: int
    steps: int
    every: bool
    grammar: bool = False  # as in MixedShape (one step)


@dataclasses.dataclass(frozen=True)
class Surface:
    """The shapes of one configuration. slots: decode-state slots (over all replicas); token_budget: prompt
    tokens a step computes at most, beside a token per decoding sequence; mixed: prompts run in mixed steps;
    fixed_context, fixed_decode_context: whether the mixed step's and the decode's attention read only to each
    sequence's length (then one context width)."""

    slots: int
    max_model_len: int
    token_budget: int
    decode_steps: int
    replicas: int = 1
    mixed: bool = True
    fixed_context: bool = True
    fixed_decode_context: bool = True

    # ---- bucketing: the shape a step pads to ----------------------------------------------------
    def tokens(self, n: int) -> int:
        """The flat tokens (over all replicas) of a mixed step whose busiest replica has n tokens (chunks
        within the budget, and decodes)."""
        return next(b for b in self.token_buckets() if b >= n) * self.replicas

    def seqs(self, n: int) -> int:
        """The sequences (over all replicas) of a mixed step whose busiest replica has n of them."""
        return next(b for b in self.seq_buckets() if b >= n) * self.replicas

    def rows(self, n: int) -> int:
        """Decode rows per replica covering its first n slots."""
        return buckets.batch_bucket(n, self.slots // self.replicas)

    def context(self, longest: int, decode: bool = False) -> int:
        """The attended context width for a step whose longest sequence attends `longest` positions."""
        fixed = self.fixed_decode_context if decode else self.fixed_context
        return self.max_model_len if fixed else buckets.attn_bucket(longest, self.max_model_len)

    # ---- enumeration: every shape, for warm-up ------------------------------------------------------
    def token_buckets(self) -> list[int]:
        """A mixed step's token counts per replica."""
        out, b = [], MIN_TOKENS
        while b < min(self.token_budget, TOKEN_STEP):
            out.append(b)
            b *= 2
        b = max(b, TOKEN_STEP)
        while b < self.token_budget:
            out.append(b)
            b += TOKEN_STEP
        top = max(self.token_budget, MIN_TOKENS)
        return out + [top] + ([self.token_budget + d for d in self._decode_margins()] if self.mixed else [])

    def _decode_margins(self) -> list[int]:
        """Room past the budget for a mixed step's decodes: powers of two from 16, then a token per slot (a
        full chunk beside a few decodes pads to budget + 16, not budget + slots: 256 + 3 tokens run as 272,
        where 288 took ~12% longer on the CPU)."""
        per, out, d = self.slots // self.replicas, [], DECODE_MARGIN
        while d < per:
            out.append(d)
            d *= 2
        return out + [per]

    def seq_buckets(self) -> list[int]:
        """A mixed step's sequence counts per replica."""
        per, out, b = self.slots // self.replicas, [], 1
        while b < per:
            out.append(b)
            b *= SEQ_GROWTH
        return out + [per]

    def contexts(self, decode: bool = False) -> list[int]:
        if self.fixed_decode_context if decode else self.fixed_context:
            return [self.max_model_len]
        return sorted({buckets.attn_bucket(n, self.max_model_len) for n in buckets.seq_buckets(self.max_model_len, 64)})

    def mixed_shapes(self) -> list[MixedShape]:
        """Every mixed step shape (a sequence holds at least one token: no more sequences than tokens), and
        the scoring steps: every token bucket with room for all the slots, under the sampler that decides
        every part on device."""
        r = self.replicas
        return [
            MixedShape(t * r, n * r, c, every)
            for t in self.token_buckets()
            for n in self.seq_buckets()
            if n <= t
            for c in self.contexts()
            for every in (False, True)
        ] + [self.scoring_shape(t * r, c) for t in self.token_buckets() for c in self.contexts()]

    def scoring_shape(self, tokens: int, context: int) -> MixedShape:
        """The shape of a mixed step that scores its prompt tokens (few compiled: it pads to all the slots)."""
        return MixedShape(tokens, self.slots // self.replicas * self.replicas, context, True, scoring=True)

    def decode_shapes(self) -> list[DecodeShape]:
        per = self.slots // self.replicas
        rows = sorted({buckets.batch_bucket(n, per) for n in range(1, per + 1)})
        steps = [self.decode_steps] if self.mixed else sorted({1, self.decode_steps})
        return [
            DecodeShape(r * self.replicas, c, s, every)
            for r in rows
            for c in self.contexts(decode=True)
            for s in steps
            for every in (False, True)
        ]

    def grammar_shapes(self) -> list[MixedShape | DecodeShape]:
        """The shapes of steps with rows under a grammar: every mixed shape, and one-step decodes of every row
        count (see the module docstring), with `grammar` set."""
        mixed = [dataclasses.replace(s, grammar=True) for s in self.mixed_shapes()]
        per = self.slots // self.replicas
        rows = sorted({buckets.batch_bucket(n, per) for n in range(1, per + 1)})
        decode = [
            DecodeShape(r * self.replicas, c, 1, every, grammar=True)
            for r in rows
            for c in self.contexts(decode=True)
            for every in (False, True)
        ]
        return [*(mixed if self.mixed else []), *decode]
