"""Long-context coding-agent sessions: the generator, its CLI and bench wiring, and the plans
the core makes for them (an Evict for a job whose KV was already dropped crashed the run)."""

from __future__ import annotations

import numpy as np
import pytest

from astraea.plan import Admit, Evict, KvAction, KvState, WorkerView
from astraea.profile import load_profile
from astraea.tools.bench.run import BenchSpec, workload_jobs
from astraea.tools.cli.main import main
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import GENERATED, generate_long_context, load_trace
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import build_scheduler


@pytest.fixture(scope="module")
def llama():
    return load_profile("llama3-8b-h100")


@pytest.fixture(scope="module")
def sessions(llama):
    return generate_long_context(300, seed=5, context_window=llama.context_window)


# --- the generator --------------------------------------------------------------------------
def test_sessions_have_the_reported_shape(sessions, llama):
    prompts = np.array([j.segments[0].prompt_tokens for j in sessions])
    calls = np.array([sum(1 for s in j.segments if s.tool) for j in sessions])
    durations = np.array([s.tool.duration_s for j in sessions for s in j.segments if s.tool])
    results = np.array([s.tool.result_tokens for j in sessions for s in j.segments if s.tool])
    outputs = np.array([s.output_tokens for j in sessions for s in j.segments])
    assert all(j.total_tokens <= llama.context_window for j in sessions)
    assert prompts.max() <= 120_000 and np.median(prompts) > 30_000
    assert (prompts >= 15_000).mean() > 0.95  # only sessions squeezed into the window shrink
    assert 20 <= calls.mean() <= 40 and calls.max() >= 50  # dozens of calls
    assert durations.min() >= 0.02 and durations.max() <= 5.0
    assert (durations < 0.1).any() and (durations > 2.0).any()  # tiny and long tools both occur
    assert 200 < results.mean() < 800 and 75 < outputs.mean() < 300  # small results and turns
    assert {s.tool.category for j in sessions for s in j.segments if s.tool} == {"file", "shell"}


def test_generator_is_deterministic_and_arrivals_are_poisson(llama):
    a = generate_long_context(200, seed=2, qps=0.05)
    assert a == generate_long_context(200, seed=2, qps=0.05)
    assert a != generate_long_context(200, seed=3, qps=0.05)
    gaps = np.diff([0.0] + [j.arrival_s for j in a])
    assert 15 < gaps.mean() < 25  # 1 / 0.05 s


def test_a_small_window_still_gets_sessions_that_fit():
    jobs = generate_long_context(50, seed=0, context_window=4096)
    assert all(j.total_tokens <= 4096 and j.segments[0].prompt_tokens >= 1 for j in jobs)


@pytest.mark.parametrize("bad", [dict(num_jobs=0, seed=0), dict(num_jobs=1, seed=0, qps=0.0)])
def test_bad_generator_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        generate_long_context(**bad)


def test_trace_gen_writes_long_context_sessions(tmp_path, llama):
    out = tmp_path / "lc.jsonl"
    assert main(["trace", "gen", "--shape", "long-context", "--jobs", "12", "--qps", "0.02",
                 "--profile", "llama3-8b-h100", "--out", str(out)]) == 0
    jobs = load_trace(out)
    want = generate_long_context(12, 0, qps=0.02, context_window=llama.context_window)
    assert [j.job_id for j in jobs] == [j.job_id for j in want]
    assert [j.total_tokens for j in jobs] == [j.total_tokens for j in want]
    assert [j.arrival_s for j in jobs] == pytest.approx([j.arrival_s for j in want], abs=1e-5)
    assert [j.api_time_s for j in jobs] == pytest.approx([j.api_time_s for j in want], abs=1e-3)


def test_bench_resolves_the_long_context_workload_by_name():
    assert "long-context" in GENERATED
    spec = BenchSpec(workload="long-context", profile="llama3-8b-h100",
                     policies=("infercept",), qps=(0.02,), jobs=7, seeds=(1,))
    assert workload_jobs(spec, 0.02, 1) == generate_long_context(7, 1, qps=0.02,
                                                                 context_window=131_072)


# --- the crash: an Evict planned for KV the worker no longer holds ---------------------------
def view(total: int, free: int, running: int, context: int, step: int, step_s: float) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=total, free_blocks=free, block_size=16,
                      host_free_blocks=100_000, running_seqs=running, max_seqs=256,
                      running_context_tokens=context, step_time_s=step_s, step_index=step)


def test_a_job_discarded_by_the_deadlock_breaker_is_not_evicted_again(llama):
    """InferCept keeps job A preserved but wanting a swap the step budget could not hide yet;
    the worker goes idle and the deadlock breaker discards A so that B fits. A later plan,
    where A's wait now looks long, must not plan an Evict for A: the worker no longer holds
    its KV (the simulated engine refused it: "job a has no resident KV on worker 0")."""
    estimator = OnlineJobEstimator()
    for _ in range(19):  # shell calls: mostly 0.3 s, one in twenty takes 20 s
        estimator.observe_api("shell", 0.3)
    estimator.observe_api("shell", 20.0)
    sched = build_scheduler("infercept", llama, estimator)
    sched.job_arrived("a", 0.0, "coding-agent")
    sched.segment_submitted("a", 0.0, 40_000, "shell")
    assert [type(x) for x in sched.build_plan(0.0, {0: view(6000, 6000, 0, 0, 0, 0.01)})] == [Admit]
    # A yields while another 46k-token job decodes: recomputing A would stall it, so A is
    # preserved; a swap beats preserving but exceeds this step's budget (0.01 s of copy).
    pause = sched.segment_ended("a", 1.0, 10, 40_000, True, "shell",
                                view(6000, 6000 - 2501 - 2900, 1, 86_410, 5, 0.01))
    assert pause.action is KvAction.PRESERVE
    # The other job ended; B (3,600 blocks) does not fit beside A's 2,501 and nothing runs:
    # the deadlock breaker drops A's KV (A's wait still looks short, so nothing else would).
    sched.job_arrived("b", 1.2, "coding-agent")
    sched.segment_submitted("b", 1.2, 57_600, "shell")
    plan = sched.build_plan(1.2, {0: view(6000, 6000 - 2501, 0, 0, 6, 0.01)})
    assert [(type(x), x.job_id, getattr(x, "action", None)) for x in plan] == [
        (Evict, "a", KvAction.DISCARD), (Admit, "b", None)]
    assert sched.jobs["a"].kv_state is KvState.DISCARDED
    # B yields to a tool too and is preserved, so the next plan revisits the paused jobs.
    # A's call outlived the short ones: discarding it now beats preserving — but A has no
    # KV left to discard or swap, so no action may name it.
    pause = sched.segment_ended("b", 1.5, 10, 57_600, True, "shell",
                                view(6000, 6000 - 3601, 0, 0, 12, 0.06))
    assert pause.action is KvAction.PRESERVE
    later = sched.build_plan(1.6, {0: view(6000, 6000 - 3601, 0, 0, 13, 0.06)})
    assert [x for x in later if x.job_id == "a"] == []
    assert sched.jobs["a"].kv_state is KvState.DISCARDED


def test_the_long_context_run_that_crashed_completes(llama):
    """The reproduction on generated sessions: seven sessions, InferCept, a 160k-token KV pool
    (the first plan after the breaker's discard evicted the discarded job again)."""
    jobs = generate_long_context(40, 0, qps=0.02, context_window=llama.context_window)[:7]
    result = Simulation(jobs, llama, "infercept", kv_blocks=10_000).run()
    assert all(r.finish_s == r.finish_s for r in result.records)  # every job finished (not NaN)
    assert result.decision_counts["reclaim_discard"] > 0  # the breaker's discards


# --- `mlfq.new_job_kv_share`: a new long prompt waits for the KV of the jobs under way ---------
def _one_job_paused_in(llama, tool: str, share: str, free_copy: str = "0.1"):
    """Astraea on a 9,000-block worker: job "a" (64,100 tokens, 4,007 blocks) is paused in a
    `tool` call with its KV preserved, and new job "b" (80,000 tokens, 5,000 blocks) does not
    fit in the free memory: only reclaiming a's KV makes room for it. A shell call is
    predicted back within b's predicted compute time (~1.5 s), a human's is not (minutes)."""
    estimator = OnlineJobEstimator()
    for _ in range(10):
        estimator.observe_api("shell", 2.0)
        estimator.observe_api("human", 300.0)
    config = SchedulerConfig().with_overrides({"mlfq.new_job_kv_share": share,
                                               "kv.free_copy_step_share": free_copy})
    sched = build_scheduler("astraea", llama, estimator, config)
    sched.job_arrived("a", 0.0, "coding-agent")
    sched.segment_submitted("a", 0.0, 64_000, tool)
    assert [type(x) for x in sched.build_plan(0.0, {0: view(9000, 9000, 0, 0, 0, 0.05)})] == [Admit]
    pause = sched.segment_ended("a", 5.0, 100, 64_000, True, tool,
                                view(9000, 9000 - 4007, 0, 0, 1, 0.05))
    assert pause.action is KvAction.PRESERVE  # memory is half free: nothing to weigh
    sched.job_arrived("b", 5.5, "coding-agent")
    sched.segment_submitted("b", 5.5, 80_000, "shell")
    return sched


def plan_at(sched, now: float, free: int, running: int = 0):
    return [(type(x).__name__, x.job_id) for x in
            sched.build_plan(now, {0: view(9000, free, running, 0, 2, 0.05)})]


def test_a_new_long_prompt_does_not_evict_a_job_about_to_return(llama):
    # Without the setting, a (its tool returns in ~1.5 s) is swapped out to make room for b,
    # which goes in when the copy lands.
    off = _one_job_paused_in(llama, "shell", "0")
    assert plan_at(off, 5.5, 9000 - 4007) == [("Evict", "a")]
    assert off.jobs["a"].kv_state is KvState.SWAPPED
    # With it, a's whole context counts as taken: 4,007 + 5,000 blocks > 0.9 · 9,000 − 90.
    on = _one_job_paused_in(llama, "shell", "0.9")
    assert on.estimator.remaining_api_s(on.jobs["a"], 5.5) < on.predicted_compute_s(on.jobs["b"])
    assert plan_at(on, 5.5, 9000 - 4007) == []
    assert on.jobs["a"].kv_state is KvState.RESIDENT
    # A smaller new job fits beside a's context and is admitted at once.
    on.job_arrived("c", 5.6, "coding-agent")
    on.segment_submitted("c", 5.6, 16_000, "file")
    assert plan_at(on, 5.6, 9000 - 4007) == [("Admit", "c")]
    # a comes back: a job under way is never held by the setting.
    on.segment_submitted("a", 7.0, 300, "shell")
    assert ("Admit", "a") in plan_at(on, 7.0, 9000 - 4007 - 1000, running=1)
    # a finishes: its memory is b's.
    on.segment_ended("a", 9.0, 50, 300, False, None, view(9000, 9000 - 5030, 1, 16_000, 3, 0.05))
    assert plan_at(on, 9.0, 9000 - 1001, running=1) == [("Admit", "b")]


def test_a_new_prompt_whose_room_free_copies_make_is_not_held(llama):
    """The same scene beside another job's 2.5 s steps: a's 5,000 blocks the prompt displaces
    copy to the host in 0.21 s, under a tenth of a step (`kv.free_copy_step_share`), so a goes
    out and comes back without delaying anyone, and b is not held for it."""
    on = _one_job_paused_in(llama, "shell", "0.9")
    assert llama.swap_time_s(5000 * 16) == pytest.approx(0.21, abs=0.005)
    plan = on.build_plan(5.5, {0: view(9000, 9000 - 4007, 1, 0, 2, 2.5)})
    assert [(type(x).__name__, x.job_id) for x in plan] == [("Evict", "a")]
    # With no copy free, the same long steps change nothing: b is held.
    off = _one_job_paused_in(llama, "shell", "0.9", free_copy="0")
    assert off.build_plan(5.5, {0: view(9000, 9000 - 4007, 1, 0, 2, 2.5)}) == []


def test_a_job_in_a_long_api_wait_does_not_hold_back_a_new_one(llama):
    """a's tool (a human, minutes) outlasts b's predicted compute: a's KV may be reclaimed."""
    on = _one_job_paused_in(llama, "human", "0.9")
    assert on.estimator.remaining_api_s(on.jobs["a"], 5.5) > on.predicted_compute_s(on.jobs["b"])
    assert plan_at(on, 5.5, 9000 - 4007) == [("Evict", "a")]
    assert on.jobs["a"].kv_state is KvState.SWAPPED


def test_a_prompt_larger_than_the_share_is_not_held_for_ever(llama):
    """4,000 blocks exceed 0.9 of a 4,300-block worker: the setting could never let the job
    in, so it does not hold it (it goes in whenever memory allows, as without the setting)."""
    sched = build_scheduler("astraea", llama, OnlineJobEstimator(),
                            SchedulerConfig().with_overrides({"mlfq.new_job_kv_share": "0.9"}))
    sched.job_arrived("big", 0.0, "coding-agent")
    sched.segment_submitted("big", 0.0, 64_000, "shell")
    assert [type(x) for x in sched.build_plan(0.0, {0: view(4300, 4300, 0, 0, 0, 0.05)})] == [Admit]


def test_only_prompts_longer_than_the_headroom_are_held(llama):
    """0.9 leaves 1,000 of 10,000 blocks: a 500-block prompt is never held; a 4,000-block one
    is held although both fit in the free memory, while a's 5,007 blocks are due back before
    its prefill would even be done."""
    estimator = OnlineJobEstimator()
    for _ in range(10):
        estimator.observe_api("file", 1.0)

    def scheduler(share: str):
        s = build_scheduler("astraea", llama, estimator,
                            SchedulerConfig().with_overrides({"mlfq.new_job_kv_share": share}))
        s.job_arrived("a", 0.0, "coding-agent")
        s.segment_submitted("a", 0.0, 80_000, "file")
        assert [type(x) for x in s.build_plan(0.0, {0: view(10_000, 10_000, 0, 0, 0, 0.05)})] == [Admit]
        s.segment_ended("a", 9.0, 100, 80_000, True, "file", view(10_000, 4993, 0, 0, 1, 0.05))
        for job_id, tokens in (("long", 64_000), ("short", 8_000)):
            s.job_arrived(job_id, 9.4, "coding-agent")
            s.segment_submitted(job_id, 9.4, tokens, "shell")
        return s

    def plan(s):
        return sorted((type(x).__name__, x.job_id) for x in
                      s.build_plan(9.5, {0: view(10_000, 4993, 0, 0, 2, 0.05)}))

    on = scheduler("0.9")
    assert estimator.remaining_api_s(on.jobs["a"], 9.5) < llama.prefill_time_s(64_000)
    assert plan(on) == [("Admit", "short")]
    assert plan(scheduler("0")) == [("Admit", "long"), ("Admit", "short")]
