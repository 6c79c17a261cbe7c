"""Stateful-MLFQ: quotas, promotion on API yields, HRRN inside levels, aging."""

from __future__ import annotations

import pytest

from astraea.plan import Admit, JobState, WorkerView
from control_plane.core.config import MlfqConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.core.mlfq import StatefulMlfq
from control_plane.core.policies import build_scheduler

# HRRN as the paper states it (W = ready-but-waiting time, T as predicted); astraea's default
# age share and T exponent are tested in test_tail.py.
CFG = MlfqConfig(num_levels=4, quota_base=1000.0, quota_growth=4.0, aging_ratio=8.0,
                 age_weight=0.0, t_exponent=1.0)


def ready(name: str, ready_since: float = 0.0, level: int = 0) -> Job:
    j = Job(name, arrival_s=0.0)
    j.mark_ready(ready_since, 10)
    j.level = level
    return j


def view(free: int = 5000, total: int = 5000) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=total, free_blocks=free, block_size=16,
                      host_free_blocks=10_000, running_seqs=0, max_seqs=256,
                      running_context_tokens=0, step_time_s=0.02, step_index=0)


# --- quotas and promotion ---------------------------------------------------------------
def test_quota_grows_geometrically_per_level():
    assert [CFG.quota(k) for k in range(4)] == [1000.0, 4000.0, 16000.0, 64000.0]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_segment_over_its_levels_quota_is_demoted_one_level(level):
    m = StatefulMlfq(CFG)
    j = ready("j", level=level)
    m.on_segment_end(j, 1.0, calls_tool=True, segment_cost=CFG.quota(level) + 1, run_s=0.1)
    assert j.level == level + 1


def test_demotion_stops_at_the_lowest_level():
    m = StatefulMlfq(CFG)
    j = ready("j", level=3)
    m.on_segment_end(j, 1.0, calls_tool=False, segment_cost=1e12, run_s=1.0)
    assert j.level == 3


@pytest.mark.parametrize("level", [1, 2, 3])
def test_api_yield_within_quota_is_promoted_one_level(level):
    m = StatefulMlfq(CFG)
    j = ready("j", level=level)
    m.on_segment_end(j, 1.0, calls_tool=True, segment_cost=CFG.quota(level), run_s=0.1)
    assert j.level == level - 1  # exactly the quota is not "exceeding" it


def test_promotion_stops_at_level_zero_and_needs_a_tool_call():
    m = StatefulMlfq(CFG)
    top = ready("top", level=0)
    m.on_segment_end(top, 1.0, calls_tool=True, segment_cost=10.0, run_s=0.1)
    assert top.level == 0
    finishing = ready("fin", level=2)
    m.on_segment_end(finishing, 1.0, calls_tool=False, segment_cost=10.0, run_s=0.1)
    assert finishing.level == 2  # ended without yielding to an API: stays


def test_promotion_can_be_switched_off():
    from dataclasses import replace

    m = StatefulMlfq(replace(CFG, promote_on_api_yield=False))
    j = ready("j", level=2)
    m.on_segment_end(j, 1.0, calls_tool=True, segment_cost=1.0, run_s=0.1)
    assert j.level == 2


def test_zero_levels_is_rejected():
    with pytest.raises(ValueError, match="num_levels"):
        StatefulMlfq(MlfqConfig(num_levels=0))


# --- through the scheduler ----------------------------------------------------------------
def _run_segment(sched, job_id, now, prefill, generated, calls_tool):
    v = view()
    actions = sched.build_plan(now, {0: v})
    assert [a.job_id for a in actions if isinstance(a, Admit)] == [job_id]
    return sched.segment_ended(job_id, now + 1.0, generated, prefill, calls_tool,
                               "qa" if calls_tool else None, view())


def test_new_jobs_enter_level_zero(gptj):
    sched = build_scheduler("astraea", gptj, OnlineJobEstimator())
    for i in range(3):
        sched.job_arrived(f"j{i}", float(i))
        sched.segment_submitted(f"j{i}", float(i), 100, "qa")
        assert sched.jobs[f"j{i}"].level == 0
    assert sched.queue_lengths() == [3, 0, 0, 0]


def test_scheduler_demotes_a_compute_heavy_segment_by_its_token_cost(gptj):
    sched = build_scheduler("astraea", gptj, OnlineJobEstimator())
    quota0 = sched.config.mlfq.quota(0)
    prefill = int(quota0) + 1000  # a prefill token costs one unit: over the quota
    sched.job_arrived("heavy", 0.0)
    sched.segment_submitted("heavy", 0.0, prefill, "qa")
    _run_segment(sched, "heavy", 0.0, prefill, 5, calls_tool=True)
    assert sched.jobs["heavy"].level == 1
    sched.segment_submitted("heavy", 5.0, 10)
    assert sched.queue_lengths() == [0, 1, 0, 0]


def test_scheduler_promotes_an_io_bound_segment(gptj):
    sched = build_scheduler("astraea", gptj, OnlineJobEstimator())
    sched.job_arrived("io", 0.0)
    sched.jobs["io"].level = 2  # as if demoted earlier
    sched.segment_submitted("io", 0.0, 100, "qa")
    assert sched.token_cost.cost(100, 10, 100) < sched.config.mlfq.quota(2)
    _run_segment(sched, "io", 0.0, 100, 10, calls_tool=True)
    assert sched.jobs["io"].level == 1
    assert sched.jobs["io"].state is JobState.API_WAIT


# --- ordering -----------------------------------------------------------------------------
def test_hrrn_order_inside_a_level():
    m = StatefulMlfq(CFG)
    # At now = 10: a: (10 + 5) / 5 = 3;  b: (2 + 0.5) / 0.5 = 5;  c: (6 + 2) / 2 = 4.
    a, b, c = ready("a", 0.0), ready("b", 8.0), ready("c", 4.0)
    m.add(a, 10.0, 5.0, 1)
    m.add(b, 10.0, 0.5, 1)
    m.add(c, 10.0, 2.0, 1)
    assert [j.job_id for j in m.candidates(10.0, [100])] == ["b", "c", "a"]
    assert m.response_ratio(c, 10.0) == pytest.approx(4.0)


def test_higher_levels_come_first_regardless_of_response_ratio():
    m = StatefulMlfq(CFG)
    starving = ready("low", 0.0, level=1)  # ratio (100 + 1) / 1 at now = 100
    fresh = ready("top", 99.0, level=0)  # ratio 2
    m.add(starving, 100.0, 1.0, 1)
    m.add(fresh, 100.0, 1.0, 1)
    assert [j.job_id for j in m.candidates(100.0, [100])] == ["top", "low"]
    assert m.queue_lengths() == [1, 1, 0, 0]


def test_work_conserving_false_takes_only_the_first_non_empty_level():
    from dataclasses import replace

    m = StatefulMlfq(replace(CFG, work_conserving=False))
    m.add(ready("l1", 0.0, level=1), 5.0, 1.0, 1)
    m.add(ready("l2", 0.0, level=2), 5.0, 1.0, 1)
    assert [j.job_id for j in m.candidates(5.0, [100])] == ["l1"]
    conserving = StatefulMlfq(CFG)
    conserving.add(ready("l1", 0.0, level=1), 5.0, 1.0, 1)
    conserving.add(ready("l2", 0.0, level=2), 5.0, 1.0, 1)
    assert [j.job_id for j in conserving.candidates(5.0, [100])] == ["l1", "l2"]


def test_aging_moves_lowest_level_jobs_over_the_ratio_to_level_zero():
    m = StatefulMlfq(CFG)  # aging_ratio 8
    old = ready("old", 0.0, level=3)  # at 10: (10 + 1) / 1 = 11 > 8 -> aged
    patient = ready("patient", 0.0, level=3)  # (10 + 10) / 10 = 2 -> stays
    middle = ready("middle", 0.0, level=2)  # ratio 11, but not the lowest level -> stays
    m.add(old, 0.0, 1.0, 1)
    m.add(patient, 0.0, 10.0, 1)
    m.add(middle, 0.0, 1.0, 1)
    order = [j.job_id for j in m.candidates(10.0, [100])]
    assert old.level == 0 and patient.level == 3 and middle.level == 2
    assert m.queue_lengths() == [1, 0, 1, 1]
    assert order == ["old", "middle", "patient"]
    # The aged job keeps its response ratio (same W and T) in its new level.
    assert m.response_ratio(old, 10.0) == pytest.approx(11.0)
    m.remove(old)
    assert m.queue_lengths() == [0, 0, 1, 1]


def test_aging_leaves_jobs_below_the_ratio_alone():
    m = StatefulMlfq(CFG)
    j = ready("j", 0.0, level=3)
    m.add(j, 0.0, 1.0, 1)
    list(m.candidates(7.0, [100]))  # ratio 8: not above
    assert j.level == 3


def test_candidates_skip_jobs_that_need_more_room():
    m = StatefulMlfq(CFG)
    m.add(ready("big", 0.0), 10.0, 1.0, 300)
    m.add(ready("small", 5.0), 10.0, 1.0, 3)
    assert [j.job_id for j in m.candidates(10.0, [100])] == ["small"]
