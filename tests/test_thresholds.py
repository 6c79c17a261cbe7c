"""Boundary cases of the core's two memory thresholds: a segment is admitted when its blocks
fit exactly (and not with one block fewer), and the pressure-adaptive KV policy switches from
always preserving to weighing waste exactly at its low-pressure threshold, weighing the
preserve waste in full from its high-pressure threshold on."""

from __future__ import annotations

import pytest

from astraea.plan import Admit, JobState, KvAction, WorkerView
from control_plane.core.config import KvPolicyConfig, SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.core.kv_policy import PressureAdaptive, memory_waste
from control_plane.core.policies import POLICIES, build_scheduler

TOTAL = 10_000  # blocks; utilisation = 1 - free / TOTAL is exact at the free counts below


def view(free: int, total: int = TOTAL, step_time_s: float = 0.0) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=total, free_blocks=free, block_size=16,
                      host_free_blocks=100_000, running_seqs=0, max_seqs=256,
                      running_context_tokens=0, step_time_s=step_time_s, step_index=0)


# --- exact-fit admission ----------------------------------------------------------------------
def admitted(policy: str, gptj, tokens: int, free: int, watermark: str | None = None) -> bool:
    config = SchedulerConfig()
    if watermark is not None:
        config = config.with_overrides({"kv.watermark": watermark})
    s = build_scheduler(policy, gptj, OnlineJobEstimator(), config)
    s.job_arrived("j", 0.0)
    s.segment_submitted("j", 0.0, tokens)
    v = view(free)
    actions = s.build_plan(0.0, {0: v})
    ok = [a.job_id for a in actions if isinstance(a, Admit)] == ["j"]
    assert v.free_blocks == (free - -(-tokens // 16) if ok else free)
    return ok


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("tokens, blocks", [(800, 50), (801, 51)])
def test_a_segment_is_admitted_into_exactly_its_blocks_and_not_one_fewer(gptj, policy, tokens,
                                                                         blocks):
    assert admitted(policy, gptj, tokens, free=blocks, watermark="0")
    assert not admitted(policy, gptj, tokens, free=blocks - 1, watermark="0")


def test_the_watermark_is_kept_free_to_the_block(gptj):
    reserve = int(KvPolicyConfig().watermark * TOTAL)  # 1 % of 10,000: 100 blocks
    assert reserve == 100
    assert admitted("astraea", gptj, 800, free=50 + reserve)
    assert not admitted("astraea", gptj, 800, free=50 + reserve - 1)


def test_a_resident_segment_needing_one_more_block_fits_exactly_into_one(gptj):
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(),
                        SchedulerConfig().with_overrides({"kv.watermark": "0"}))
    s.job_arrived("j", 0.0)
    s.segment_submitted("j", 0.0, 96)  # 6 blocks
    assert [a.job_id for a in s.build_plan(0.0, {0: view(TOTAL)})] == ["j"]
    pause = s.segment_ended("j", 1.0, 1, 96, True, "qa", view(TOTAL))  # KV of 96 positions
    assert pause.action is KvAction.PRESERVE
    s.segment_submitted("j", 2.0, 16)  # 113 tokens: 8 blocks, 2 more than it holds
    assert s.build_plan(2.0, {0: view(1)}) == []
    assert [a.job_id for a in s.build_plan(2.0, {0: view(2)})] == ["j"]


# --- the pressure thresholds ----------------------------------------------------------------
class Remaining:
    """Predicts the same remaining API time for every job."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def remaining_api_s(self, job: Job, now: float) -> float:
        return self.seconds


def paused(context: int) -> Job:
    j = Job("j", arrival_s=0.0)
    j.mark_ready(0.0, context)
    j.mark_running(0.0, 0)
    j.mark_segment_end(1.0, 0, calls_tool=True)
    assert j.state is JobState.API_WAIT
    return j


# The thresholds of the waste rule alone: astraea's swap_before_discard (on by default, tested
# in test_tail.py) would swap instead of discarding where the host has room.
WASTE_RULE = KvPolicyConfig(swap_before_discard=False)


def test_the_default_thresholds():
    assert (KvPolicyConfig().low_pressure, KvPolicyConfig().high_pressure) == (0.97, 0.99)


@pytest.mark.parametrize("free, weight", [
    (301, 0.0), (300, 0.0), (299, 1 / 200), (200, 0.5), (101, 1 - 1 / 200), (100, 1.0),
    (0, 1.0)])
def test_pressure_weight_at_and_either_side_of_the_default_thresholds(gptj, free, weight):
    p = PressureAdaptive(gptj, Remaining(1.0), KvPolicyConfig())
    assert p.pressure_weight(view(free).utilization) == pytest.approx(weight)


@pytest.mark.parametrize("free, action, reason", [
    (301, KvAction.PRESERVE, "low memory pressure"),  # utilisation 0.9699
    (300, KvAction.PRESERVE, "low memory pressure"),  # exactly at the threshold, 0.97
    (299, KvAction.DISCARD, "pressure: discard < weighted preserve"),  # 0.9701
])
def test_a_long_call_is_preserved_up_to_the_low_threshold_and_discarded_just_past_it(
        gptj, free, action, reason):
    # A 1,000 s call on 2,000 tokens: its preserve waste is ~10^4 × the recompute's, so any
    # weight above zero tips it to discard (no swap budget: a zero step time).
    assert memory_waste(gptj, 2000, 1000.0, 0).preserve > 1000 * \
        memory_waste(gptj, 2000, 0.0, 0).discard
    p = PressureAdaptive(gptj, Remaining(1000.0), WASTE_RULE)
    d = p.on_api_yield(paused(2000), 1.0, view(free))
    assert (d.action, d.reason) == (action, reason)


@pytest.mark.parametrize("free, action", [
    (150, KvAction.PRESERVE),  # 0.985: weight 0.75, 0.75 × preserve < discard
    (100, KvAction.DISCARD),  # exactly at the high threshold, 0.99: weight 1
    (50, KvAction.DISCARD),  # past it: still weight 1
])
def test_the_preserve_waste_counts_in_full_from_the_high_threshold_on(gptj, free, action):
    c = 2000
    discard = memory_waste(gptj, c, 0.0, 0).discard
    t_int = 1.03 * discard / (c * gptj.kv_bytes_per_token)  # preserve = 1.03 × discard
    p = PressureAdaptive(gptj, Remaining(t_int), WASTE_RULE)
    assert p.on_api_yield(paused(c), 1.0, view(free)).action is action
