"""The scheduler alone, with no model: admission, chunked prefill, slot reuse, cancellation, limits."""

from __future__ import annotations

import pytest

from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Sequence
from jaxllm.errors import QueueFullError
from jaxllm.sampling_params import SamplingParams


class _Tok:
    """A tokenizer stand-in: the scheduler never decodes, sequences only need `decode`."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def seq(rid: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0) -> Sequence:
    return Sequence(
        rid,
        0,
        list(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens, temperature=0),
        0,
        _Tok(),
        (0,),
        1000,
        arrival,
    )


def feed(sched: Scheduler, plan, token: int = 5):
    """Play the model: every last prefill chunk and every decode returns `decode_steps` tokens."""
    for c in plan.prefills:
        if c.last:
            c.seq.inflight -= 1
            c.seq.append(token, None)
    for s in plan.decodes:
        s.inflight -= sched.decode_steps
        for _ in range(sched.decode_steps):
            s.append(token, None)
    for s in list(sched.running.values()):
        if s.finished:
            sched.release(s)


def test_fcfs_admission_into_free_slots():
    sched = Scheduler(max_seqs=2, token_budget=1000)
    a, b, c = seq("a", 5, arrival=1), seq("b", 5, arrival=2), seq("c", 5, arrival=3)
    for s in (a, b, c):
        sched.add([s])
    plan = sched.schedule()
    assert [ch.seq for ch in plan.prefills] == [a, b] and list(sched.waiting) == [c]
    assert (a.slot, b.slot) == (0, 1)


def test_chunked_prefill_under_a_token_budget_and_decodes_go_first():
    sched = Scheduler(max_seqs=4, token_budget=16)
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


def test_budget_counts_decodes_and_chunks_are_powers_of_two():
    sched = Scheduler(max_seqs=4, token_budget=20)
    d = seq("d", 2, max_tokens=50)
    sched.add([d])
    feed(sched, sched.schedule())
    sched.add([seq("p", 100)])
    plan = sched.schedule()
    assert plan.decodes == [d]
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 16)]  # 20 - 1 decode = 19 -> 16


def test_finished_sequences_free_their_slot_for_the_next():
    sched = Scheduler(max_seqs=1, token_budget=100)
    a, b = seq("a", 3, max_tokens=1), seq("b", 3)
    sched.add([a])
    sched.add([b])
    feed(sched, sched.schedule())
    assert a.finished and a.finish_reason == "length" and sched.num_free_slots == 1
    plan = sched.schedule()
    assert [c.seq for c in plan.prefills] == [b] and b.slot == 0


def test_abort_frees_slots_and_drops_waiting():
    sched = Scheduler(max_seqs=1, token_budget=100)
    a, b = seq("a", 3), seq("b", 3)
    sched.add([a])
    sched.add([b])
    sched.schedule()
    assert sched.abort("a") == [a] and a.finish_reason == "abort" and sched.num_free_slots == 1
    sched.abort("b")
    assert b.finish_reason == "abort" and not sched.has_work()


def test_waiting_queue_limit_refuses_whole_requests():
    sched = Scheduler(max_seqs=1, token_budget=100, max_waiting=2)
    sched.add([seq("a", 3)])
    sched.add([seq("b", 3)])
    with pytest.raises(QueueFullError):
        sched.add([seq("c", 3)])
    sched.schedule()  # a leaves the queue for a slot
    sched.add([seq("c", 3)])
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_in_flight_tokens_stop_extra_decodes():
    sched = Scheduler(max_seqs=1, token_budget=100, decode_steps=4)
    s = seq("a", 3, max_tokens=5)
    sched.add([s])
    sched.schedule()  # prefill: 1 token in flight
    plan = sched.schedule()  # decode: 4 more in flight = 5 = max_tokens
    assert plan.decodes == [s] and s.inflight == 5
    assert sched.schedule().decodes == []  # nothing more can be needed until results come back
