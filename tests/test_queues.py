"""Ready queues (FCFS, HRRN) and the FCFS / PLAS disciplines built on them."""

from __future__ import annotations

import numpy as np
import pytest

from control_plane.core.config import PlasConfig
from control_plane.core.discipline import Fcfs, Plas
from control_plane.core.job import Job
from control_plane.core.queues import TOP_K, FcfsQueue, HrrnQueue


def job(name: str, arrival: float = 0.0, ready_since: float = 0.0, waited: float = 0.0) -> Job:
    j = Job(name, arrival_s=arrival)
    j.mark_ready(ready_since, 10)
    j.waiting_s = waited
    return j


# --- FcfsQueue --------------------------------------------------------------------------
def test_fcfs_queue_orders_by_key_and_ties_by_insertion():
    q = FcfsQueue()
    a, b, c, d = (job(x) for x in "abcd")
    q.push(c, 3.0)
    q.push(a, 1.0)
    q.push(b, 3.0)  # same key as c, pushed later: after c
    q.push(d, 2.0)
    assert [j.job_id for j in q] == ["a", "d", "c", "b"]
    assert len(q) == 4 and b in q


def test_fcfs_queue_remove_keeps_order_of_the_rest():
    q = FcfsQueue()
    jobs = [job(f"j{i}") for i in range(5)]
    for i, j in enumerate(jobs):
        q.push(j, float(i % 2))  # keys 0,1,0,1,0
    q.remove(jobs[2])
    assert jobs[2] not in q
    assert [j.job_id for j in q.snapshot()] == ["j0", "j4", "j1", "j3"]


def test_fcfs_queue_rejects_a_job_twice():
    q = FcfsQueue()
    a = job("a")
    q.push(a, 1.0)
    with pytest.raises(KeyError, match="a"):
        q.push(a, 2.0)


# --- HrrnQueue --------------------------------------------------------------------------
def test_hrrn_ranks_by_response_ratio_not_by_shortest_job():
    # score = (W + T) / T with W = accumulated wait + time since ready.
    # At now = 20:  A: W=1,  T=1 -> 2;   B: W=20, T=2 -> 11;
    #               C: W=5,  T=1 -> 6;   D: W=4+2=6, T=1 -> 7.
    q = HrrnQueue()
    a = job("A", ready_since=19.0)
    b = job("B", ready_since=0.0)
    c = job("C", ready_since=15.0)
    d = job("D", ready_since=18.0, waited=4.0)
    for j, t in ((a, 1.0), (b, 2.0), (c, 1.0), (d, 1.0)):
        q.push(j, t, need_blocks=1)
    assert [j.job_id for j in q.ranked(20.0)] == ["B", "D", "C", "A"]
    assert q.score_of(b, 20.0) == pytest.approx(11.0)
    assert q.score_of(d, 20.0) == pytest.approx(7.0)
    assert q.score_of(a, 20.0) == pytest.approx(2.0)


def test_hrrn_order_changes_with_time():
    # Y (T=10) has waited since 0, X (T=1) since 10. At 10.5: X 1.5, Y 2.05 -> Y first;
    # at 12: X 3, Y 2.2 -> X first (short jobs' ratios grow faster).
    q = HrrnQueue()
    x = job("X", ready_since=10.0)
    y = job("Y", ready_since=0.0)
    q.push(x, 1.0, 1)
    q.push(y, 10.0, 1)
    assert [j.job_id for j in q.ranked(10.5)] == ["Y", "X"]
    assert [j.job_id for j in q.ranked(12.0)] == ["X", "Y"]


def test_hrrn_order_matches_hand_computed_scores_beyond_top_k():
    rng = np.random.default_rng(7)
    n = 3 * TOP_K + 5
    q = HrrnQueue(capacity=4)  # forces growth as well
    expected = {}
    now = 100.0
    for i in range(n):
        ready, waited, t = float(rng.uniform(0, 100)), float(rng.uniform(0, 10)), float(rng.uniform(0.1, 5))
        j = job(f"j{i}", ready_since=ready, waited=waited)
        q.push(j, t, need_blocks=1)
        expected[j.job_id] = (waited + now - ready + t) / t
    order = [j.job_id for j in q.ranked(now)]
    assert sorted(order) == sorted(expected)
    assert order == sorted(expected, key=lambda k: -expected[k])


def test_hrrn_skips_jobs_that_need_more_blocks_than_the_room_and_follows_room_changes():
    q = HrrnQueue()
    big = job("big", ready_since=0.0)  # best score, needs 50
    mid = job("mid", ready_since=5.0)  # needs 20
    small = job("small", ready_since=8.0)  # needs 5
    q.push(big, 1.0, 50)
    q.push(mid, 1.0, 20)
    q.push(small, 1.0, 5)
    assert [j.job_id for j in q.ranked(10.0, room=[30])] == ["mid", "small"]
    # The builder lowers the room as it admits: after "mid" takes 20, "small" still fits.
    room = [30]
    got = []
    for j in q.ranked(10.0, room):
        got.append(j.job_id)
        room[0] -= 20 if j.job_id == "mid" else 5
    assert got == ["mid", "small"]
    room = [25]
    got = []
    for j in q.ranked(10.0, room):
        got.append(j.job_id)
        room[0] = 3  # nothing fits any more
    assert got == ["mid"]


def test_hrrn_remove_keeps_the_other_rows_intact():
    q = HrrnQueue()
    jobs = [job(f"j{i}", ready_since=float(i)) for i in range(5)]
    for i, j in enumerate(jobs):
        q.push(j, float(i + 1), need_blocks=i)
    q.remove(jobs[1])  # the last row moves into the hole
    assert jobs[1] not in q and len(q) == 4
    now = 10.0
    for i in (0, 2, 3, 4):
        assert q.score_of(jobs[i], now) == pytest.approx((now - i + i + 1) / (i + 1))
    assert [j.job_id for j in q.ranked(now, room=[3])] == ["j0", "j2", "j3"]


def test_hrrn_over_ratio_lists_exactly_the_jobs_above_it():
    q = HrrnQueue()
    q.push(job("a", ready_since=0.0), 1.0, 1)  # at 10: 11
    q.push(job("b", ready_since=0.0), 10.0, 1)  # at 10: 2
    q.push(job("c", ready_since=3.0), 1.0, 1)  # at 10: 8 (not above 8)
    assert [j.job_id for j in q.over_ratio(10.0, 8.0)] == ["a"]


def test_hrrn_rejects_a_job_twice():
    q = HrrnQueue()
    a = job("a")
    q.push(a, 1.0, 1)
    with pytest.raises(KeyError):
        q.push(a, 1.0, 1)


# --- FCFS discipline --------------------------------------------------------------------
def test_fcfs_by_job_keeps_a_returning_jobs_place_by_arrival():
    d = Fcfs("job")
    late = job("late", arrival=5.0, ready_since=6.0)
    early = job("early", arrival=1.0, ready_since=9.0)  # returned from a tool later
    d.add(late, 6.0, 1.0, 1)
    d.add(early, 9.0, 1.0, 1)
    assert [j.job_id for j in d.candidates(10.0, [100])] == ["early", "late"]
    assert d.blocking


def test_fcfs_by_segment_orders_by_readiness_and_puts_preempted_work_in_front():
    d = Fcfs("segment")
    a = job("a", arrival=0.0, ready_since=3.0)
    b = job("b", arrival=1.0, ready_since=2.0)
    d.add(a, 3.0, 1.0, 1)
    d.add(b, 3.0, 1.0, 1)
    assert [j.job_id for j in d.candidates(4.0, [100])] == ["b", "a"]
    # Two running segments are preempted, x then y: both go before everything, y first.
    x = job("x", ready_since=4.0)
    y = job("y", ready_since=4.0)
    d.on_preempted(x, 5.0)
    d.add(x, 5.0, 1.0, 1)
    d.on_preempted(y, 6.0)
    d.add(y, 6.0, 1.0, 1)
    assert [j.job_id for j in d.candidates(7.0, [100])] == ["y", "x", "b", "a"]
    # Re-queued normally later, x is ordered by its readiness again.
    d.remove(x)
    x.ready_since_s = 8.0
    d.add(x, 8.0, 1.0, 1)
    assert [j.job_id for j in d.candidates(9.0, [100])] == ["y", "b", "a", "x"]


def test_fcfs_rejects_an_unknown_ordering():
    with pytest.raises(ValueError):
        Fcfs("deadline")


# --- PLAS discipline --------------------------------------------------------------------
def test_plas_queue_is_chosen_by_attained_service():
    p = Plas(PlasConfig(boundaries_s=(1.0, 2.0, 4.0)))
    assert p.level_for_service(0.0) == 0
    assert p.level_for_service(0.99) == 0
    assert p.level_for_service(1.0) == 1
    assert p.level_for_service(3.0) == 2
    assert p.level_for_service(100.0) == 3


def test_plas_serves_least_attained_service_first_and_skips_what_cannot_fit():
    p = Plas(PlasConfig(boundaries_s=(1.0, 2.0, 4.0), starvation_ratio=1e9))
    old = job("old", ready_since=0.0)
    old.attained_s = 3.0  # level 2
    new = job("new", ready_since=5.0)  # level 0
    huge = job("huge", ready_since=4.0)  # level 0 but too big
    p.add(old, 5.0, 1.0, need_blocks=1)
    p.add(huge, 5.0, 1.0, need_blocks=500)
    p.add(new, 5.0, 1.0, need_blocks=1)
    assert p.queue_lengths() == [2, 0, 1, 0]
    assert [j.job_id for j in p.candidates(6.0, [10])] == ["new", "old"]


def test_plas_promotes_a_starved_job_to_the_top_queue():
    p = Plas(PlasConfig(boundaries_s=(1.0, 2.0), starvation_ratio=2.0))
    starved = job("starved", ready_since=0.0)
    starved.attained_s = 1.5  # level 1; waiting 10 s / 1.5 s > 2
    p.add(starved, 0.0, 1.0, 1)
    assert p.level_of(starved) == 1
    list(p.candidates(10.0, [10]))
    assert p.level_of(starved) == 0
    assert p.queue_lengths() == [1, 0, 0]


def test_plas_counts_the_partial_run_of_a_preempted_call():
    p = Plas(PlasConfig())
    j = job("j")
    j.attained_s = 0.5
    j.running_since_s = 10.0
    p.on_preempted(j, 10.75)
    assert j.attained_s == pytest.approx(1.25)
