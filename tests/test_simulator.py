"""The discrete-event simulator: invariants for every policy under real memory pressure.

Workload: 80 jobs of the InferCept mix at 4 jobs/s on GPT-J-6B/A100 with the KV cache cut to
1,000 blocks (16,000 tokens, about four times the largest job), so memory runs out, every KV
action is used, and the engine preempts.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from conftest import SMALL_48

from astraea.plan import Admit, JobState, KvAction
from astraea.profile import HardwareProfile, load_profile
from astraea.tools.sim.metrics import JobRecord, idle_jct_s, summarize
from astraea.tools.sim.oracle import TraceOracle
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import JobTrace, Segment, ToolCall, generate_mix, generate_tiny_agent
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.core.policies import POLICIES, build_scheduler
from worker.sim.engine import SimulatedEngine

PROFILE = "gptj-6b-a100"
N_JOBS, QPS, KV_BLOCKS = 80, 4.0, 1000
SEEDS = (0, 1)
CASES = [(p, s) for s in SEEDS for p in POLICIES]
CASE_IDS = [f"{p}-seed{s}" for p, s in CASES]


class CheckedSimulation(Simulation):
    """Checks every engine's block accounting after each instant of the simulation:
    GPU blocks in use = blocks of running sequences + KV held for paused/ended jobs + blocks
    a swap-out is still reading; host blocks = swapped-out copies + copies being swapped in."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.violations: list = []

    def _start_idle_workers(self) -> None:
        super()._start_idle_workers()
        for e in self.engines:
            held = sum(b for b, _ in e.held.values())
            running = sum(e.blocks_of(j) for j in e.running)
            reading = sum(t.blocks for t in e.transfers if t.direction.startswith("out"))
            pool = e.pool
            if pool.used != held + running + reading or pool.free < 0 or pool.cached_total < 0 \
                    or pool.used > pool.total:
                self.violations.append((self.now, e.worker_id, "gpu", pool.used, held, running, reading))
            incoming = sum(t.blocks for t in e.transfers if t.direction == "in")
            swapped = sum(b for b, _ in e.swapped.values())
            if e.host_used != swapped + incoming or e.host_used > e.host_total:
                self.violations.append((self.now, e.worker_id, "host", e.host_used, swapped, incoming))


@functools.cache
def workload(seed: int, n: int = N_JOBS, qps: float = QPS) -> tuple[JobTrace, ...]:
    profile = load_profile(PROFILE)
    return tuple(generate_mix(n, seed, qps=qps, context_window=profile.context_window))


@functools.cache
def simulate(policy: str, seed: int, workers: int = 1, kv_blocks: int = KV_BLOCKS):
    sim = CheckedSimulation(list(workload(seed)), load_profile(PROFILE), policy,
                            num_workers=workers, kv_blocks=kv_blocks)
    result = sim.run()
    return sim, result


def finished(result):
    return [r for r in result.records if not math.isnan(r.finish_s)]


# --- invariants, every policy -----------------------------------------------------------------
@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_every_job_completes(policy, seed):
    sim, result = simulate(policy, seed)
    stuck = sorted(j.job_id for j in sim.sched.jobs.values() if j.state is not JobState.FINISHED)
    assert result.summary["jobs_completed"] == N_JOBS, f"never finished: {stuck[:10]}"


@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_tokens_are_conserved(policy, seed):
    sim, result = simulate(policy, seed)
    done = finished(result)
    assert done
    for r in done:
        assert r.final_context_tokens == sim.trace[r.job_id].total_tokens, r.job_id


@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_kv_block_accounting_holds_throughout_and_memory_is_really_under_pressure(policy, seed):
    sim, result = simulate(policy, seed)
    (engine,) = sim.engines
    assert sim.violations == []
    assert engine.pool.total == KV_BLOCKS
    assert engine.peak_used_blocks <= KV_BLOCKS
    assert engine.peak_used_blocks >= 0.9 * KV_BLOCKS  # the cut really bites
    assert result.peak_kv_utilization == pytest.approx(engine.peak_used_blocks / KV_BLOCKS)


@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_no_kv_is_left_in_use_at_the_end(policy, seed):
    sim, _ = simulate(policy, seed)
    (engine,) = sim.engines
    assert engine.transfers == []
    assert engine.running == {} and engine.held == {} and engine.swapped == {}
    assert engine.pool.used == 0
    assert engine.host_used == 0


@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_no_job_finishes_faster_than_on_an_idle_engine(policy, seed):
    _, result = simulate(policy, seed)
    done = finished(result)
    assert done
    for r in done:
        assert r.idle_jct_s > 0
        assert r.jct_s >= r.idle_jct_s - 1e-9, (r.job_id, r.jct_s, r.idle_jct_s)
        assert r.slowdown >= 1 - 1e-9


@pytest.mark.parametrize("policy", list(POLICIES))
def test_same_seed_gives_identical_results(policy):
    _, first = simulate(policy, 1)
    again = CheckedSimulation(list(workload(1)), load_profile(PROFILE), policy,
                              kv_blocks=KV_BLOCKS).run()

    def key(res):
        return ([(r.job_id, r.finish_s, r.final_context_tokens, tuple(r.ttft_s)) for r in res.records],
                res.makespan_s, res.decision_counts, res.engine_counters, res.summary)

    assert key(again) == key(first)


@pytest.mark.parametrize("policy", ["astraea", "infercept"])
@pytest.mark.parametrize("seed", SEEDS)
def test_pressure_makes_the_adaptive_policies_use_all_three_kv_actions(policy, seed):
    if policy == "astraea":
        # Astraea's default swaps what the waste rule would discard while the host has room
        # (kv.swap_before_discard); the rule alone uses all three actions.
        _, default = simulate(policy, seed)
        assert default.decision_counts.get("preserve", 0) > 0
        assert default.decision_counts.get("swap", 0) > 0
        config = SchedulerConfig().with_overrides({"kv.swap_before_discard": "false"})
        result = CheckedSimulation(list(workload(seed)), load_profile(PROFILE), policy,
                                   kv_blocks=KV_BLOCKS, config=config).run()
    else:
        _, result = simulate(policy, seed)
    counts = result.decision_counts
    for action in ("preserve", "swap", "discard"):
        assert counts.get(action, 0) > 0, counts
    assert result.engine_counters["tokens_swapped_out"] > 0


@pytest.mark.parametrize("policy", ["vllm-fcfs", "autellix-plas"])
def test_discarding_policies_never_preserve_or_swap_at_a_tool_call(policy):
    _, result = simulate(policy, 1)
    counts = result.decision_counts
    assert counts.get("discard", 0) > 0
    assert counts.get("preserve", 0) == 0 and counts.get("swap", 0) == 0
    # ...but the prefix cache saves part of the recompute.
    assert result.engine_counters["prefix_hit_tokens"] > 0


# --- more workers ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy, seed", CASES, ids=CASE_IDS)
def test_two_workers_complete_every_job_and_leak_nothing(policy, seed):
    sim, result = simulate(policy, seed, workers=2, kv_blocks=700)
    assert sim.violations == []
    assert result.summary["jobs_completed"] == N_JOBS
    for r in result.records:
        assert r.final_context_tokens == sim.trace[r.job_id].total_tokens
    for e in sim.engines:
        assert e.pool.used == 0 and e.host_used == 0


# --- the scheduler's free blocks are the engine's ------------------------------------------
def test_the_scheduler_counts_a_resumed_jobs_kv_as_the_engine_holds_it(simple_profile):
    """A segment ends with a history of k·16 + 1 tokens: the engine holds k blocks (the last
    sampled token has no KV yet), so resuming it takes one new block. The plan must leave
    the view with exactly what the engine can still allocate: the scheduler once counted
    k + 1 blocks as held and planned an Admit the engine refused (EngineError)."""
    config = SchedulerConfig().with_overrides({"kv.watermark": "0"})  # the engine has none
    sched = build_scheduler("astraea", simple_profile, OnlineJobEstimator(), config)
    engine = SimulatedEngine(simple_profile, 0, kv_blocks=100)
    outputs = {"a": 13, "b": 4}

    def plan(now):
        v = engine.view()
        actions = sched.build_plan(now, {0: v})
        for a in actions:
            assert isinstance(a, Admit), a
            engine.admit(a.job_id, a.new_tokens, a.context_tokens, outputs[a.job_id],
                         a.swap_in, now, a.priority)
        assert v.free_blocks == engine.pool.allocatable
        return [a.job_id for a in actions]

    sched.job_arrived("a", 0.0)
    sched.segment_submitted("a", 0.0, 100, "qa")
    assert plan(0.0) == ["a"]
    now, ended = 0.0, []
    while not ended:
        duration, _ = engine.start_step(now)
        now += duration
        ended = engine.finish_step(now).ended
    assert [(e.job_id, e.generated_tokens) for e in ended] == [("a", 13)]
    pause = sched.segment_ended("a", now, 13, ended[0].prefill_tokens, True, "qa", engine.view())
    assert pause.action is KvAction.PRESERVE
    engine.pause("a", pause.action, now)
    assert engine.held["a"] == (7, 113) and engine.pool.allocatable == 93
    now += 1.0  # the tool returns 3 tokens (116: 8 blocks) as "b" arrives wanting the other 93
    sched.segment_submitted("a", now, 3)
    sched.job_arrived("b", now)
    sched.segment_submitted("b", now, 93 * 16)
    assert len(plan(now)) == 1


# The small model on two CPU cores (docs/results/small-llama-cpu-profile.json) with a pool of


@pytest.mark.parametrize("policy, overrides", [(p, {}) for p in POLICIES]
                         + [("astraea", {"kv.reclaim_for_ready_jobs": "false"}),
                            ("astraea", {"kv.reclaim_for_ready_jobs": "true"})],
                         ids=list(POLICIES) + ["astraea-no-reclaim", "astraea-reclaim"])
def test_the_tiny_agent_trace_runs_on_a_48_block_pool(policy, overrides):
    """The trace that found the miscount (EngineError "job j26: needs 3 KV blocks, worker 0
    has 2" under astraea and astraea-paper)."""
    profile = HardwareProfile.from_dict(SMALL_48, "small-48.json")
    config = SchedulerConfig().with_overrides(overrides)
    sim = CheckedSimulation(generate_tiny_agent(200, 1, 4.0), profile, policy, config=config)
    result = sim.run()
    assert sim.violations == []
    assert result.summary["jobs_completed"] == 200


# --- exact timing on an idle engine ---------------------------------------------------------
def _by_hand_job():
    return JobTrace("solo", (Segment(100, 3, ToolCall("t", "qa", 0.5, 20)), Segment(0, 2, None)), 0.0, "qa")


def test_idle_jct_by_hand(simple_profile):
    # Simple profile: step = 10 ms + 0.1 ms/token + 0.001 ms per context token read, budget 64.
    ms = 0.0
    ms += 10 + 0.1 * 64                      # prefill chunk 1 (reads nothing before it)
    ms += 10 + 0.1 * 36 + 0.001 * 64         # prefill chunk 2, samples token 1
    ms += 10 + 0.1 + 0.001 * 100             # token 2
    ms += 10 + 0.1 + 0.001 * 101             # token 3
    ms += 500                                # the tool
    ms += 10 + 0.1 * 20 + 0.001 * 103        # prefill the 20 result tokens, token 1
    ms += 10 + 0.1 + 0.001 * 123             # token 2
    assert idle_jct_s(_by_hand_job(), simple_profile) == pytest.approx(ms / 1e3)


@pytest.mark.parametrize("policy", ["astraea", "astraea-paper"])
def test_a_job_alone_under_a_preserving_policy_takes_exactly_its_idle_jct(simple_profile, policy):
    result = Simulation([_by_hand_job()], simple_profile, policy).run()
    (r,) = result.records
    assert result.decision_counts == {"preserve": 1}
    assert r.jct_s == pytest.approx(r.idle_jct_s, rel=1e-12)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_well_separated_jobs_never_beat_their_idle_jct(gptj, policy):
    jobs = generate_mix(12, 3, qps=0.002, context_window=gptj.context_window)  # ~500 s apart
    result = Simulation(jobs, gptj, policy).run()
    assert result.summary["jobs_completed"] == 12
    for r in result.records:
        assert r.jct_s >= r.idle_jct_s - 1e-9, r.job_id
        if policy.startswith("astraea"):
            # Alone on the engine, memory is plentiful: every call preserves, so the job runs
            # exactly as on the idle engine.
            assert r.jct_s == pytest.approx(r.idle_jct_s, rel=1e-9), r.job_id


# --- inputs ---------------------------------------------------------------------------------
def test_simulation_rejects_bad_inputs(gptj):
    untimed = generate_mix(3, 0)
    with pytest.raises(ValueError, match="arrival"):
        Simulation(untimed, gptj, "astraea")
    timed = generate_mix(3, 0, qps=1.0)
    with pytest.raises(ValueError, match="unique"):
        Simulation(timed + timed[:1], gptj, "astraea")
    with pytest.raises(ValueError, match="num_workers"):
        Simulation(timed, gptj, "astraea", num_workers=0)
    with pytest.raises(ValueError, match="predictor"):
        Simulation(timed, gptj, "astraea", predictor="crystal-ball")
    with pytest.raises(ValueError, match="unknown policy"):
        Simulation(timed, gptj, "lifo")
    with pytest.raises(ValueError, match="kv_blocks must be at least 1"):
        Simulation(timed, gptj, "astraea", kv_blocks=0)


def test_oracle_predictor_runs_and_reads_the_trace(gptj):
    jobs = list(workload(1, n=30))
    result = Simulation(jobs, gptj, "astraea", predictor="oracle", kv_blocks=KV_BLOCKS).run()
    assert result.summary["jobs_completed"] == 30
    oracle = TraceOracle({j.job_id: j for j in jobs})
    trace = next(j for j in jobs if len(j.segments) > 2)
    job = Job(trace.job_id, arrival_s=0.0)
    job.mark_ready(0.0, 10)
    job.segment_index = 1
    assert oracle.output_tokens(job) == trace.segments[1].output_tokens
    job.mark_running(0.0, 0)
    job.mark_segment_end(5.0, 1, calls_tool=True)  # now waiting on segment 1's tool
    duration = trace.segments[1].tool.duration_s
    assert oracle.api_duration_s(job) == duration
    assert oracle.remaining_api_s(job, 5.0 + duration / 2) == pytest.approx(duration / 2)
    assert oracle.remaining_api_s(job, 5.0 + duration + 1) == 0.0


# --- metrics --------------------------------------------------------------------------------
def test_summary_statistics_by_hand():
    records = []
    for i, (jct, idle) in enumerate([(1.0, 0.5), (2.0, 1.0), (3.0, 3.0), (10.0, 2.0)]):
        r = JobRecord(f"j{i}", "qa", arrival_s=float(i), api_s=0.0, output_tokens=10)
        r.finish_s = i + jct
        r.idle_jct_s = idle
        records.append(r)
    records.append(JobRecord("never", "qa", arrival_s=0.0))  # unfinished: not counted
    s = summarize(records, makespan_s=13.0)
    jcts = [1.0, 2.0, 3.0, 10.0]
    assert s["jobs_completed"] == 4
    assert s["mean_jct_s"] == pytest.approx(4.0)
    assert s["p50_jct_s"] == pytest.approx(np.percentile(jcts, 50))
    assert s["p90_jct_s"] == pytest.approx(np.percentile(jcts, 90))
    assert s["p99_jct_s"] == pytest.approx(np.percentile(jcts, 99))
    assert s["max_jct_s"] == 10.0
    assert s["mean_slowdown"] == pytest.approx((2 + 2 + 1 + 5) / 4)
    assert s["throughput_jobs_per_s"] == pytest.approx(4 / 13.0)
    assert summarize([JobRecord("x", "qa", 0.0)], 0.0) == {"jobs_completed": 0}


def test_simulator_records_ttft_per_segment_and_summary_keys(simple_profile):
    result = Simulation([_by_hand_job()], simple_profile, "astraea").run()
    (r,) = result.records
    assert len(r.ttft_s) == 2  # one first token per segment
    assert r.ttft_s[0] == pytest.approx((10 + 6.4 + 10 + 3.6 + 0.064) / 1e3)
    assert r.api_s == 0.5 and r.output_tokens == 5
    assert r.normalized_latency_s == pytest.approx((r.jct_s - 0.5) / 5)
