"""The compiled surface, with no model: every shape a step can be padded to is among those enumerated for
warm-up, and the configuration bounds how many there are."""

from __future__ import annotations

import pytest

from jaxllm.engine.surface import DecodeShape, MixedShape, Surface


@pytest.mark.parametrize("budget", [16, 100, 512, 2048, 3000])
def test_every_token_count_pads_to_an_enumerated_bucket_within_the_budget_and_decodes(budget):
    surface = Surface(slots=32, max_model_len=4096, token_budget=budget, decode_steps=4)
    enumerated = set(surface.token_buckets())
    for n in range(1, budget + 32 + 1):  # prompt chunks within the budget, and a token per decoding slot
        t = surface.tokens(n)
        assert t in enumerated and n <= t <= max(budget, 16) + 32
    assert max(enumerated) == budget + 32
    # Past 512 the buckets grow in steps of 512, so padding wastes less than 512 tokens there.
    assert all(surface.tokens(n) - n < 512 for n in range(513, budget + 1))
    # Separate prefill calls: decodes are not in the flat run, and the budget is the largest bucket.
    separate = Surface(slots=32, max_model_len=4096, token_budget=budget, decode_steps=4, mixed=False)
    assert max(separate.token_buckets()) == max(budget, 16)


@pytest.mark.parametrize("slots", [1, 3, 16, 32, 100])
def test_every_sequence_and_row_count_pads_to_an_enumerated_bucket(slots):
    surface = Surface(slots=slots, max_model_len=1024, token_budget=512, decode_steps=2)
    seqs = set(surface.seq_buckets())
    rows = {shape.rows for shape in surface.decode_shapes()}
    for n in range(1, slots + 1):
        assert n <= surface.seqs(n) <= slots and surface.seqs(n) in seqs
        assert n <= surface.rows(n) <= slots and surface.rows(n) in rows


def test_data_parallel_decode_rows_are_per_replica_buckets_times_replicas():
    surface = Surface(slots=12, max_model_len=1024, token_budget=512, decode_steps=2, replicas=3)
    assert sorted({s.rows for s in surface.decode_shapes()}) == [3, 6, 12]  # 1, 2 and 4 rows of each replica


def test_data_parallel_mixed_shapes_give_each_replica_an_equal_part_sized_for_the_busiest():
    surface = Surface(slots=12, max_model_len=1024, token_budget=100, decode_steps=2, replicas=3)
    assert surface.token_buckets() == [16, 32, 64, 100, 104]  # per replica: the budget and its 4 decodes
    assert surface.seq_buckets() == [1, 4]
    shapes = surface.mixed_shapes()
    assert all(s.tokens % 3 == 0 and s.seqs % 3 == 0 and s.seqs <= s.tokens for s in shapes)
    for busiest in range(1, 105):
        assert MixedShape(surface.tokens(busiest), surface.seqs(min(busiest, 4)), 1024, False) in shapes
        assert busiest * 3 <= surface.tokens(busiest) <= 104 * 3


def test_fixed_context_is_one_width_else_powers_of_two_from_64():
    fixed = Surface(slots=4, max_model_len=1000, token_budget=64, decode_steps=2)
    assert {s.context for s in fixed.mixed_shapes() + fixed.decode_shapes()} == {1000}
    assert fixed.context(5) == fixed.context(999, decode=True) == 1000
    bucketed = Surface(4, 1000, 64, 2, fixed_context=False, fixed_decode_context=False)
    assert bucketed.contexts() == [64, 128, 256, 512, 1000]
    assert [bucketed.context(n) for n in (1, 64, 65, 600, 1000)] == [64, 64, 128, 1000, 1000]
    assert len(bucketed.mixed_shapes()) == 5 * len(fixed.mixed_shapes())


def test_the_shape_count_follows_from_the_configuration():
    # The serving default: 32 slots, 512 tokens a step, decode_steps 2.
    surface = Surface(slots=32, max_model_len=2048, token_budget=512, decode_steps=2)
    # past the budget: room for 16 decodes, then for all 32 (a full chunk and 3 decodes pad to 528, not 544)
    assert surface.token_buckets() == [16, 32, 64, 128, 256, 512, 528, 544]
    assert surface.tokens(512 + 3) == 528 and surface.tokens(512 + 17) == 544
    assert surface.seq_buckets() == [1, 4, 16, 32]
    # a step never holds more sequences than tokens: 16 tokens take 1, 4 or 16 sequences
    # and one scoring shape (prompt logprobs) per token bucket, with room for every slot
    assert len(surface.mixed_shapes()) == 2 * (3 + 7 * 4) + 8
    assert MixedShape(16, 32, 2048, True, scoring=True) in surface.mixed_shapes()
    assert MixedShape(16, 32, 2048, True) not in surface.mixed_shapes()
    # mixed: decodes alone always run decode_steps; separate: also one step while prompts wait
    assert len(surface.decode_shapes()) == 6 * 2
    separate = Surface(slots=32, max_model_len=2048, token_budget=512, decode_steps=2, mixed=False)
    assert len(separate.decode_shapes()) == 6 * 2 * 2
    assert DecodeShape(32, 2048, 1, False) in separate.decode_shapes()
