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
    assert result.decision_counts["discard"] > 0
