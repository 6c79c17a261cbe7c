"""KV decisions during API waits: InferCept's waste formulas (ICML 2024) and the policies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from astraea.plan import JobState, KvAction, WorkerView
from control_plane.core.config import ContinuumConfig, KvPolicyConfig
from control_plane.core.job import Job
from control_plane.core.kv_policy import (
    AlwaysDiscard,
    MinWaste,
    PressureAdaptive,
    TimeToLive,
    memory_waste,
)


class FixedEstimator:
    """Predicts a fixed remaining API time per job (default for all)."""

    name = "fixed"

    def __init__(self, remaining: float = 1.0, per_job: dict | None = None,
                 samples: list | None = None) -> None:
        self.remaining = remaining
        self.per_job = per_job or {}
        self.samples = samples or []

    def output_tokens(self, job):
        return 10.0

    def api_duration_s(self, job):
        return self.per_job.get(job.job_id, self.remaining)

    def remaining_api_s(self, job, now):
        return self.per_job.get(job.job_id, self.remaining)

    def api_duration_samples(self, category):
        return self.samples

    def observe_output(self, job, tokens):
        pass

    def observe_api(self, category, duration_s):
        pass


def paused_job(name: str, context: int, worker: int = 0) -> Job:
    j = Job(name, arrival_s=0.0)
    j.mark_ready(0.0, context)
    j.mark_running(0.0, worker)
    j.mark_segment_end(1.0, 0, calls_tool=True)
    assert j.state is JobState.API_WAIT and j.context_tokens == context
    return j


def view(profile, free: int, total: int = 10_000, running_context: int = 0,
         host_free: int = 10_000, step_time_s: float = 0.0, step_index: int = 0) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=total, free_blocks=free, block_size=profile.block_size,
                      host_free_blocks=host_free, running_seqs=1, max_seqs=256,
                      running_context_tokens=running_context, step_time_s=step_time_s,
                      step_index=step_index)


# --- waste formulas ---------------------------------------------------------------------
def t_fwd_by_hand(tokens: int, c_ms: float, a_ms: float, budget: int) -> float:
    """The profile's cost model: each prefill step costs c + a·tokens, in chunks of the step budget."""
    t, left = 0.0, tokens
    while left > 0:
        chunk = min(left, budget)
        t += c_ms + a_ms * chunk
        left -= chunk
    return t / 1e3


@pytest.mark.parametrize("context, other, t_int", [(1000, 0, 0.5), (1500, 6000, 20.0), (384, 100, 0.0)])
def test_memory_waste_follows_the_design_formulas(gptj, context, other, t_int):
    m = 2 * 28 * 4096 * 2  # GPT-J-6B fp16 KV bytes per token: K and V, 28 layers, 4096 wide, 2 bytes
    t_fwd = t_fwd_by_hand(context, 10.0, 0.0463, 384)
    t_swap = context * m / 25e9  # PCIe 4 x16, 25 GB/s
    w = memory_waste(gptj, context, t_int, other)
    assert w.preserve == pytest.approx(t_int * context * m)
    assert w.discard == pytest.approx(t_fwd * context * m + t_fwd * other * m)
    assert w.swap == pytest.approx(2 * t_swap * (other + context) * m)
    assert w.context_tokens == context and w.remaining_api_s == t_int


# --- vLLM / Autellix ------------------------------------------------------------------------
def test_always_discard_discards_even_with_free_memory(gptj):
    p = AlwaysDiscard(gptj, FixedEstimator(100.0))
    d = p.on_api_yield(paused_job("j", 500), 1.0, view(gptj, free=10_000))
    assert d.action is KvAction.DISCARD and d.job_id == "j"


# --- InferCept ------------------------------------------------------------------------------
def test_min_waste_preserves_a_short_call_and_discards_a_long_one_without_swap_budget(gptj):
    v = view(gptj, free=100, step_time_s=0.0)  # zero budget: nothing can be swapped hidden
    short = paused_job("short", 1000)
    long = paused_job("long", 1000)
    est = FixedEstimator(per_job={"short": 1e-4, "long": 30.0})
    p = MinWaste(gptj, est)
    w_short = memory_waste(gptj, 1000, 1e-4, 0)
    w_long = memory_waste(gptj, 1000, 30.0, 0)
    assert w_short.preserve < w_short.discard and w_long.discard < w_long.preserve
    assert p.on_api_yield(short, 1.0, v).action is KvAction.PRESERVE
    assert p.on_api_yield(long, 1.0, v).action is KvAction.DISCARD


def test_min_waste_swaps_what_one_steps_budget_hides_and_retries_the_rest_next_step(gptj):
    # Budget = step time × swap bandwidth / bytes per token = 0.03 × 25e9 / 458752 ≈ 1634 tokens.
    budget = 0.03 * 25e9 / gptj.kv_bytes_per_token
    assert 1000 < budget < 2000
    est = FixedEstimator(remaining=30.0)
    p = MinWaste(gptj, est)
    # Use an API time where preserving beats discarding but swapping beats both.
    est.remaining = 0.05
    w = memory_waste(gptj, 1000, 0.05, 0)
    assert w.swap < w.preserve <= w.discard
    assert 0.05 > 2 * gptj.swap_time_s(1000)  # the round trip fits in the wait
    a, b = paused_job("a", 1000), paused_job("b", 1000)
    v0 = view(gptj, free=100, step_time_s=0.03, step_index=7)
    assert p.on_api_yield(a, 1.0, v0).action is KvAction.SWAP
    assert p.on_api_yield(b, 1.0, v0).action is KvAction.PRESERVE  # budget spent this step
    assert p.revisit(1.0, [b], v0) == []
    v1 = view(gptj, free=100, step_time_s=0.03, step_index=8)  # the next step renews it
    again = p.revisit(1.01, [b], v1)
    assert [(d.job_id, d.action) for d in again] == [("b", KvAction.SWAP)]


def test_min_waste_does_not_swap_without_host_room(gptj):
    p = MinWaste(gptj, FixedEstimator(remaining=30.0))
    j = paused_job("j", 1000)
    v = view(gptj, free=100, host_free=10, step_time_s=0.03)  # 1000 tokens need 63 blocks
    assert p.on_api_yield(j, 1.0, v).action is not KvAction.SWAP


def test_min_waste_does_not_swap_when_the_call_returns_before_the_round_trip(gptj):
    tiny = 2 * gptj.swap_time_s(1000) / 2  # half the round trip
    p = MinWaste(gptj, FixedEstimator(remaining=tiny))
    v = view(gptj, free=100, step_time_s=0.03)
    assert p.on_api_yield(paused_job("j", 1000), 1.0, v).action is not KvAction.SWAP


# --- Astraea --------------------------------------------------------------------------------
@pytest.mark.parametrize("u, weight", [(0.0, 0.0), (0.5, 0.0), (0.6, 0.25), (0.7, 0.5), (0.9, 1.0), (1.0, 1.0)])
def test_pressure_weight_rises_linearly_between_the_thresholds(gptj, u, weight):
    p = PressureAdaptive(gptj, FixedEstimator(), KvPolicyConfig(low_pressure=0.5, high_pressure=0.9))
    assert p.pressure_weight(u) == pytest.approx(weight)


def test_pressure_adaptive_preserves_below_low_pressure_even_for_a_long_call(gptj):
    p = PressureAdaptive(gptj, FixedEstimator(remaining=1000.0), KvPolicyConfig())
    v = view(gptj, free=6000, total=10_000, step_time_s=0.03)  # utilisation 0.4
    assert p.on_api_yield(paused_job("j", 2000), 1.0, v).action is KvAction.PRESERVE


def test_pressure_adaptive_swaps_below_low_pressure_when_the_copy_is_free(gptj):
    # 64 tokens of GPT-J KV copy in 1.2 ms, under a tenth of a 30 ms step: the job swaps out,
    # and its memory is there for a ready job; 2,000 tokens take 37 ms and stay.
    p = PressureAdaptive(gptj, FixedEstimator(remaining=5.0), KvPolicyConfig())
    v = view(gptj, free=6000, total=10_000, step_time_s=0.03)  # utilisation 0.4
    assert gptj.swap_time_s(64) < 0.003 < gptj.swap_time_s(2000)
    d = p.on_api_yield(paused_job("small", 64), 1.0, v)
    assert (d.action, d.reason) == (KvAction.SWAP, "low memory pressure, free copy")
    assert p.on_api_yield(paused_job("big", 2000), 1.0, v).action is KvAction.PRESERVE
    # Off (`kv.free_copy_step_share=0`), or with nothing else running (no step to hide the
    # copy behind: the job alone would wait for it on its return): kept.
    off = PressureAdaptive(gptj, FixedEstimator(remaining=5.0),
                           KvPolicyConfig(free_copy_step_share=0.0))
    assert off.on_api_yield(paused_job("small", 64), 1.0, v).action is KvAction.PRESERVE
    idle = replace(v, running_seqs=0)
    assert p.on_api_yield(paused_job("small", 64), 1.0, idle).action is KvAction.PRESERVE


def test_a_free_copy_still_needs_a_long_enough_call_host_room_and_the_step_budget(gptj):
    v = view(gptj, free=6000, total=10_000, step_time_s=0.03)
    soon = PressureAdaptive(gptj, FixedEstimator(remaining=1e-4), KvPolicyConfig())
    assert soon.on_api_yield(paused_job("j", 64), 1.0, v).action is KvAction.PRESERVE
    p = PressureAdaptive(gptj, FixedEstimator(remaining=5.0), KvPolicyConfig())
    full_host = view(gptj, free=6000, total=10_000, step_time_s=0.03, host_free=0)
    assert p.on_api_yield(paused_job("j", 64), 1.0, full_host).action is KvAction.PRESERVE
    # One 30 ms step hides 1,634 tokens: ten 150-token copies, not an eleventh.
    actions = [p.on_api_yield(paused_job(f"j{i}", 150), 1.0, v).action for i in range(11)]
    assert actions == [KvAction.SWAP] * 10 + [KvAction.PRESERVE]


def test_pressure_adaptive_under_full_pressure_discards_a_long_call_without_budget(gptj):
    # The waste rule alone (swap_before_discard, on by default, is tested in test_tail.py).
    p = PressureAdaptive(gptj, FixedEstimator(remaining=30.0),
                         KvPolicyConfig(swap_before_discard=False))
    v = view(gptj, free=50, total=10_000, step_time_s=0.0)  # utilisation 0.995, no budget
    w = memory_waste(gptj, 2000, 30.0, 0)
    assert w.discard < w.preserve
    d = p.on_api_yield(paused_job("j", 2000), 1.0, v)
    assert d.action is KvAction.DISCARD
    assert d.inputs["pressure_weight"] == 1.0


def test_pressure_adaptive_swaps_within_the_budget_under_pressure(gptj):
    p = PressureAdaptive(gptj, FixedEstimator(remaining=30.0), KvPolicyConfig())
    v = view(gptj, free=200, total=10_000, step_time_s=0.03)  # u = 0.98
    assert p.on_api_yield(paused_job("j", 1000), 1.0, v).action is KvAction.SWAP


def test_pressure_adaptive_weighs_preserve_waste_by_pressure(gptj):
    # At weight w the rule compares discard against w · preserve. Pick T_int so that the full
    # preserve waste exceeds discard but half of it does not.
    c = 2000
    d_waste = memory_waste(gptj, c, 0.0, 0).discard
    t_int = 1.5 * d_waste / (c * gptj.kv_bytes_per_token)  # preserve = 1.5 × discard
    p = PressureAdaptive(gptj, FixedEstimator(remaining=t_int),
                         KvPolicyConfig(low_pressure=0.5, high_pressure=0.9,
                                        swap_before_discard=False))
    half = view(gptj, free=3000, total=10_000, step_time_s=0.0)  # u = 0.7 → weight 0.5
    full = view(gptj, free=500, total=10_000, step_time_s=0.0)  # u = 0.95 → weight 1
    assert p.on_api_yield(paused_job("a", c), 1.0, half).action is KvAction.PRESERVE
    assert p.on_api_yield(paused_job("b", c), 1.0, full).action is KvAction.DISCARD


def test_reclaim_evicts_the_most_wasteful_paused_jobs_first_until_enough_is_freed(gptj):
    est = FixedEstimator(per_job={"small": 50.0, "big": 50.0, "soon": 1e-6, "mid": 20.0})
    p = PressureAdaptive(gptj, est, KvPolicyConfig(reclaim_for_ready_jobs=True))
    jobs = [paused_job("small", 160), paused_job("big", 3200), paused_job("soon", 3200),
            paused_job("mid", 1600)]
    v = view(gptj, free=0, total=10_000, host_free=10_000)
    # Preserve waste (remaining × context): big 160000, mid 32000, small 8000; "soon" returns
    # before any eviction could pay off. 250 blocks: big (200) then mid (100).
    out = p.reclaim(1.0, jobs, v, blocks_needed=250)
    assert [d.job_id for d in out] == ["big", "mid"]
    assert all(d.action is KvAction.SWAP for d in out)  # host has room, waits are long
    # By default reclaim only swaps: with no host room it leaves everything in place...
    assert p.reclaim(1.0, jobs, view(gptj, free=0, host_free=0), blocks_needed=250) == []
    # ...and with reclaim_discards it drops the same jobs instead.
    p = PressureAdaptive(gptj, est, KvPolicyConfig(reclaim_for_ready_jobs=True, reclaim_discards=True))
    none_on_host = p.reclaim(1.0, jobs, view(gptj, free=0, host_free=0), blocks_needed=250)
    assert [(d.job_id, d.action) for d in none_on_host] == [("big", KvAction.DISCARD),
                                                            ("mid", KvAction.DISCARD)]


def test_reclaim_can_be_switched_off(gptj):
    p = PressureAdaptive(gptj, FixedEstimator(50.0), KvPolicyConfig(reclaim_for_ready_jobs=False))
    assert p.reclaim(1.0, [paused_job("j", 1600)], view(gptj, free=0), blocks_needed=10) == []


# --- Continuum ------------------------------------------------------------------------------
def test_ttl_pins_until_the_deadline_then_discards(gptj):
    est = FixedEstimator(samples=[0.1, 0.2, 0.3, 0.4])  # short calls: pinning pays
    p = TimeToLive(gptj, est, ContinuumConfig(), lambda: 0.5)
    j = paused_job("j", 1000)
    tau, _ = p.ttl_for(j)
    assert 0 < tau <= 0.4
    d = p.on_api_yield(j, 10.0, view(gptj, free=5000))
    assert d.action is KvAction.PRESERVE
    assert p.next_deadline() == pytest.approx(10.0 + tau)
    assert p.revisit(10.0 + tau / 2, [j], view(gptj, free=5000)) == []
    expired = p.revisit(10.0 + tau, [j], view(gptj, free=5000))
    assert [(x.job_id, x.action) for x in expired] == [("j", KvAction.DISCARD)]
    assert p.next_deadline() is None


def test_ttl_choice_maximises_probability_times_benefit_minus_cost(gptj):
    samples = [0.01, 0.05, 1.0, 50.0]
    p = TimeToLive(gptj, FixedEstimator(samples=samples), ContinuumConfig(memory_price_s=1.0), lambda: 0.0)
    j = paused_job("j", 2000)
    benefit = gptj.prefill_time_s(2000)
    price = 2000 / (gptj.kv_capacity_blocks * gptj.block_size)
    gains = {t: (i + 1) / len(samples) * benefit - t * price for i, t in enumerate(samples)}
    best = max(gains, key=gains.get)
    tau, inputs = p.ttl_for(j)
    assert tau == pytest.approx(best if gains[best] > 0 else 0.0)


def test_ttl_unpins_the_furthest_deadline_first_under_pressure(gptj):
    est = FixedEstimator(samples=[0.1, 0.2, 0.3])
    p = TimeToLive(gptj, est, ContinuumConfig(), lambda: 0.5)
    a, b = paused_job("a", 1600), paused_job("b", 1600)
    p.on_api_yield(a, 1.0, view(gptj, free=5000))
    p.on_api_yield(b, 2.0, view(gptj, free=5000))  # pinned later: deadline further away
    out = p.reclaim(2.0, [a, b], view(gptj, free=0), blocks_needed=50)
    assert [(d.job_id, d.action) for d in out] == [("b", KvAction.DISCARD)]
