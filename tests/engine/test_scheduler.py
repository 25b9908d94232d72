"""The scheduler alone, with no model: admission, chunked prefill, slot reuse, cancellation, limits."""

from __future__ import annotations

import pytest

from jaxllm.engine.kv_pages import PagePool
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Sampled, Sequence
from jaxllm.errors import QueueFullError
from jaxllm.sampling_params import SamplingParams


def seq(rid: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(
        rid,
        0,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens, temperature=0),
        0,
        (0,),
        1000,
    )


def make_sched(max_seqs: int, token_budget: int, pages: int = 1000, page_size: int = 16, prefix_caching=True, **kw):
    return Scheduler(max_seqs, token_budget, pool=PagePool(pages, page_size, prefix_caching), **kw)


def feed(sched: Scheduler, plan, token: int = 5):
    """Play the model: every last prefill chunk samples one token and every decode `decode_steps`, handed back
    through the scheduler's own update."""
    return sched.update(plan, {s: Sampled([token] * steps) for s, steps in plan.sampling()})


def test_fcfs_admission_into_free_slots():
    sched = make_sched(max_seqs=2, token_budget=1000)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    for s in (a, b, c):
        sched.add([s])
    plan = sched.schedule()
    assert [ch.seq for ch in plan.prefills] == [a, b] and list(sched.waiting) == [c]
    assert (a.slot, b.slot) == (0, 1)


def test_chunked_prefill_under_a_token_budget_and_decodes_go_first():
    sched = make_sched(max_seqs=4, token_budget=16)
    long, short = seq("long", 40, max_tokens=8), seq("short", 3, max_tokens=8)
    sched.add([long])
    plan = sched.schedule()
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 16)] and not plan.prefills[0].last
    sched.add([short])
    plan = sched.schedule()  # the running long prompt continues first, then short is admitted
    assert [(c.seq.request_id, c.start, c.end) for c in plan.prefills] == [("long", 16, 32)]
    feed(sched, plan)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.end) for c in plan.prefills] == [("long", 32, 40), ("short", 0, 3)]
    assert all(c.last for c in plan.prefills)
    feed(sched, plan)
    plan = sched.schedule()
    assert {s.request_id for s in plan.decodes} == {"long", "short"} and not plan.prefills


def test_decodes_leave_the_budget_to_prefill_and_chunks_are_powers_of_two():
    sched = make_sched(max_seqs=4, token_budget=20)
    d = seq("d", 2, max_tokens=50)
    sched.add([d])
    feed(sched, sched.schedule())
    sched.add([seq("p", 100)])
    plan = sched.schedule()
    assert plan.decodes == [d]
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 16)]  # the largest power of two within 20
    sched = make_sched(max_seqs=4, token_budget=16)
    sched.add([d := seq("d", 2, max_tokens=50)])
    feed(sched, sched.schedule())
    sched.add([seq("p", 16)])
    plan = sched.schedule()
    assert plan.decodes == [d]
    assert [(c.start, c.end, c.last) for c in plan.prefills] == [(0, 16, True)]  # whole, beside the decode


def test_finished_sequences_free_their_slot_for_the_next():
    sched = make_sched(max_seqs=1, token_budget=100)
    a, b = seq("a", 3, max_tokens=1), seq("b", 3)
    sched.add([a])
    sched.add([b])
    feed(sched, sched.schedule())
    assert a.finished and a.finish_reason == "length" and sched.num_free_slots == 1
    plan = sched.schedule()
    assert [c.seq for c in plan.prefills] == [b] and b.slot == 0


def test_abort_frees_slots_and_drops_waiting():
    sched = make_sched(max_seqs=1, token_budget=100)
    a, b = seq("a", 3), seq("b", 3)
    sched.add([a])
    sched.add([b])
    sched.schedule()
    assert sched.abort("a") == [a] and a.finish_reason == "abort" and sched.num_free_slots == 1
    sched.abort("b")
    assert b.finish_reason == "abort" and not sched.has_work()


def test_waiting_queue_limit_refuses_whole_requests():
    sched = make_sched(max_seqs=1, token_budget=100, max_waiting=2)
    sched.add([seq("a", 3)])
    sched.add([seq("b", 3)])
    with pytest.raises(QueueFullError):
        sched.add([seq("c", 3)])
    sched.schedule()  # a leaves the queue for a slot
    sched.add([seq("c", 3)])
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_in_flight_tokens_stop_extra_decodes():
    sched = make_sched(max_seqs=1, token_budget=100, decode_steps=4)
    s = seq("a", 3, max_tokens=5)
    sched.add([s])
    sched.schedule()  # prefill: 1 token in flight
    plan = sched.schedule()  # decode: 4 more in flight = 5 = max_tokens
    assert plan.decodes == [s] and s.inflight == 5
    assert sched.schedule().decodes == []  # nothing more can be needed until results come back


# ---- pages ----------------------------------------------------------------------------------------
def run_until_done(sched: Scheduler, limit: int = 1000) -> list:
    plans = []
    while sched.has_work() and len(plans) < limit:
        plans.append(sched.schedule())
        feed(sched, plans[-1])
    assert not sched.has_work(), "the scheduler did not finish"
    return plans


def test_pages_follow_growth_and_return_when_sequences_end():
    sched = make_sched(max_seqs=2, token_budget=100, pages=10, page_size=4)
    a = seq("a", 6, max_tokens=5)
    sched.add([a])
    feed(sched, sched.schedule())
    assert len(a.pages) == 2 and sched.pool.num_used == 2  # 6 prompt tokens
    run_until_done(sched)
    assert a.finish_reason == "length" and sched.pool.num_used == 0 and a.pages == []


def test_decode_pages_cover_every_position_written():
    sched = make_sched(max_seqs=1, token_budget=100, pages=10, page_size=4, decode_steps=4)
    a = seq("a", 4, max_tokens=9)  # the prompt exactly fills its first page
    sched.add([a])
    plan = sched.schedule()
    assert len(a.pages) == 1
    feed(sched, plan)
    plan = sched.schedule()  # 4 steps write positions 4..7
    assert plan.decode_steps == 4 and len(a.pages) == 2
    feed(sched, plan)
    plan = sched.schedule()  # 4 more write positions 8..11
    assert len(a.pages) == 3


def test_the_newest_sequence_is_preempted_when_pages_run_out_and_recomputed_later():
    # 6 pages of 4 tokens: two sequences of 8 + 8 tokens need 4 pages each by the end.
    sched = make_sched(max_seqs=2, token_budget=100, pages=6, page_size=4)
    a, b = seq("a", 7, max_tokens=8), seq("b", 7, max_tokens=8)
    sched.add([a])
    sched.add([b])
    plans = run_until_done(sched)
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 8
    assert b.preemptions >= 1 and a.preemptions == 0 and sched.preemptions == b.preemptions
    # b came back with its prompt and the outputs it had as one prefill, sampling its next token.
    # (It may start past 0: its own pages, freed on preemption, stay findable by prefix.)
    re = [c for p in plans for c in p.prefills if c.seq is b and c.end > 7]
    assert re and re[-1].last and re[-1].end == b.prefill_len > 7
    assert sched.pool.num_used == 0


def test_a_shared_prefix_is_found_and_only_the_rest_is_prefilled():
    sched = make_sched(max_seqs=2, token_budget=100, pages=20, page_size=4)
    a = seq("a", 10, max_tokens=2)
    sched.add([a])
    feed(sched, sched.schedule())
    b = seq("b", 10, max_tokens=2)
    b.prompt_ids = list(range(1, 9)) + [50, 51]  # shares a's first 8 tokens = 2 full pages
    sched.add([b])
    plan = sched.schedule()
    (chunk,) = [c for c in plan.prefills if c.seq is b]
    assert (chunk.start, chunk.end) == (8, 10) and b.cached_tokens == 8
    assert b.pages[:2] == a.pages[:2] and sched.pool.refs[a.pages[0]] == 2


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = make_sched(max_seqs=2, token_budget=100, pages=20, page_size=4)
    a = seq("a", 8, max_tokens=1)
    sched.add([a])
    run_until_done(sched)
    b = seq("b", 8, max_tokens=1)
    sched.add([b])
    plan = sched.schedule()
    assert [(c.start, c.end) for c in plan.prefills] == [(4, 8)]  # page 2 holds the last token: recomputed


def test_a_prefix_being_computed_is_waited_for_not_recomputed():
    sched = make_sched(max_seqs=3, token_budget=100, pages=20, page_size=4)
    a, b, other = seq("a", 9), seq("b", 9), seq("other", 9)
    other.prompt_ids = [99] * 9
    sched.add([a])
    sched.add([b])
    plan = sched.schedule()
    # b shares a's pages, which this step is still writing: it waits instead of computing them again
    # (or reading them before they are written); FCFS keeps `other` behind it.
    assert [(c.seq, c.start, c.end) for c in plan.prefills] == [(a, 0, 9)] and list(sched.waiting) == [b]
    sched.add([other])
    feed(sched, plan)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.end) for c in plan.prefills] == [(b, 8, 9), (other, 0, 9)]
    assert b.pages[:2] == a.pages[:2]


def test_prefix_caching_off_prefills_everything():
    sched = make_sched(max_seqs=2, token_budget=100, pages=20, page_size=4, prefix_caching=False)
    a = seq("a", 9, max_tokens=1)
    sched.add([a])
    run_until_done(sched)
    b = seq("b", 9, max_tokens=1)
    sched.add([b])
    assert [(c.start, c.end) for c in sched.schedule().prefills] == [(0, 9)] and b.cached_tokens == 0


def test_admission_waits_for_pages_instead_of_preempting():
    sched = make_sched(max_seqs=2, token_budget=100, pages=3, page_size=4)
    a, b = seq("a", 10, max_tokens=2), seq("b", 6, max_tokens=2)
    sched.add([a])
    sched.add([b])
    plan = sched.schedule()
    assert [c.seq for c in plan.prefills] == [a] and list(sched.waiting) == [b]
    feed(sched, plan)
    run_until_done(sched)
    assert a.finish_reason == b.finish_reason == "length" and a.preemptions == b.preemptions == 0


@pytest.mark.parametrize("prompt_len", [90, 93, 94, 97, 98, 101])
def test_a_pool_that_exactly_fits_never_preempts_near_the_end(prompt_len):
    # 8 pages of 16 = 128 positions = prompt + max_tokens: the last multi-step decodes must not ask for
    # pages past the sequence's last token.
    sched = make_sched(max_seqs=1, token_budget=256, pages=8, page_size=16, decode_steps=4)
    s = seq("a", prompt_len, max_tokens=128 - prompt_len)
    sched.add([s])
    run_until_done(sched)
    assert len(s.output_ids) == 128 - prompt_len and sched.preemptions == 0


def replicated_sched(max_seqs: int, pages: int, replicas: int = 2, page_size: int = 4):
    pools = [PagePool(pages, page_size) for _ in range(replicas)]
    return Scheduler(max_seqs, 100, pool=pools)


def test_data_parallel_replicas_split_the_slots_and_each_sequence_keeps_to_its_replicas_pool():
    sched = replicated_sched(max_seqs=4, pages=6)
    a, b, c = seq("a", 9), seq("b", 5), seq("c", 5)
    b.prompt_ids, c.prompt_ids = [66] * 5, [77] * 5  # no shared prefix
    for s in (a, b, c):
        sched.add([s])
    sched.schedule()
    # a goes to replica 0 (a tie: the first); b and c to replica 1, which has more pages free (4 > 3 for c).
    assert [(s.replica, s.slot) for s in (a, b, c)] == [(0, 0), (1, 2), (1, 3)]
    assert sorted(b.pages + c.pages) == [0, 1, 2, 3]  # page ids are local to the replica's pool
    assert [p.num_used for p in sched.pools] == [3, 4]
    with pytest.raises(ValueError, match="use .pools"):
        sched.pool  # noqa: B018
    with pytest.raises(ValueError, match="do not split evenly over 2 replicas"):
        replicated_sched(max_seqs=3, pages=6)


def test_a_shared_prefix_goes_to_the_replica_that_caches_it():
    sched = replicated_sched(max_seqs=4, pages=20)
    a = seq("a", 10, max_tokens=2)
    sched.add([a])
    feed(sched, sched.schedule())
    a_pages = list(a.pages)
    other = seq("other", 5)
    other.prompt_ids = [99] * 5
    sched.add([other])
    feed(sched, sched.schedule())  # no shared prefix: the replica with more free pages (1)
    b = seq("b", 10, max_tokens=2)
    b.prompt_ids = list(range(1, 9)) + [50, 51]  # a's first two pages, cached on replica 0 (fewer free pages)
    sched.add([b])
    (chunk,) = [c for c in sched.schedule().prefills if c.seq is b]
    assert (a.replica, other.replica, b.replica) == (0, 1, 0)
    assert (chunk.start, chunk.end) == (8, 10) and b.pages[:2] == a_pages[:2]


def test_preemption_takes_pages_only_from_the_short_replica():
    # Replica 0: 4 pages of 4 tokens for a and b (b shares a's first page, so it goes there too), 5 pages
    # needed by the end. Replica 1 holds the newest sequence, which must not be preempted for replica 0.
    sched = replicated_sched(max_seqs=4, pages=4)
    a, b, newest = seq("a", 7, max_tokens=5), seq("b", 7, max_tokens=5), seq("newest", 9, max_tokens=7)
    newest.prompt_ids = [42] * 9  # 16 tokens by the end: replica 1's 4 pages
    for s in (a, b, newest):
        sched.add([s])
        feed(sched, sched.schedule())
    assert (a.replica, b.replica, newest.replica) == (0, 0, 1)
    plans = run_until_done(sched)
    assert b.preemptions >= 1 and a.preemptions == 0 and newest.preemptions == 0
    assert all(s.finish_reason == "length" for s in (a, b, newest)) and len(b.output_ids) == 5
    assert plans and [p.num_used for p in sched.pools] == [0, 0]


def test_update_takes_tokens_until_a_stop_token_and_drops_the_rest():
    sched = make_sched(max_seqs=2, token_budget=100, decode_steps=4)
    s = seq("a", 5, max_tokens=20)
    sched.add([s])
    (out,) = feed(sched, sched.schedule(), token=7)
    assert out.token_ids == [7] and not out.finished
    plan = sched.schedule()
    assert plan.decode_steps == 4 and s.inflight == 4
    (out,) = sched.update(plan, {s: Sampled([8, 0, 9, 9])})  # 0 is the stop token
    assert out.token_ids == [8, 0] and out.finished and s.finish_reason == "stop" and s.stop_reason == 0
    assert s.inflight == 0 and s not in sched.running.values() and sched.num_free_slots == 2 and not sched.has_work()


def test_update_drops_tokens_of_a_sequence_finished_meanwhile_and_counts_them_back():
    sched = make_sched(max_seqs=2, token_budget=100, decode_steps=2)
    a, b = seq("a", 5, max_tokens=10), seq("b", 5, max_tokens=10)
    sched.add([a])
    sched.add([b])
    feed(sched, sched.schedule())
    plan = sched.schedule()
    sched.finish(a, "stop", "a stop string")
    outs = sched.update(plan, {a: Sampled([3, 3]), b: Sampled([4, 4])})
    assert [o.seq for o in outs] == [b] and a.inflight == 0 and a.output_ids == [5]
    assert a.stop_reason == "a stop string" and sched.num_free_slots == 1


def test_update_hands_out_prompt_logprobs_once_with_the_first_token():
    from jaxllm.engine.sequence import TokenLogprob

    sched = make_sched(max_seqs=1, token_budget=100)
    s = Sequence("a", 0, [1, 2, 3], SamplingParams(max_tokens=2, prompt_logprobs=0), 0, (0,), 1000)
    sched.add([s])
    plan = sched.schedule()
    scores = {s: {1: TokenLogprob(2, -1.0, []), 2: TokenLogprob(3, -2.0, [])}}
    (out,) = sched.update(plan, {s: Sampled([5])}, scores)
    assert [lp and lp.logprob for lp in out.prompt_logprobs] == [None, -1.0, -2.0]
    (out,) = feed(sched, sched.schedule())
    assert out.prompt_logprobs is None and out.finished and s.finish_reason == "length"
