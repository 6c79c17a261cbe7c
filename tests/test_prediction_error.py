"""`astraea bench --prediction-error`: the estimator wrapper that makes predictions wrong on
purpose, its effect on the simulated policies, and the bench matrix and report over σ."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from astraea.plan import JobState
from astraea.profile import load_profile
from astraea.tools.bench.report import aggregate, format_degradation
from astraea.tools.cli.main import main
from astraea.tools.sim.oracle import TraceOracle
from astraea.tools.sim.prediction_error import PredictionErrorEstimator
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import JobTrace, Segment, ToolCall, generate_mix
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job


def _job(job_id: str, segment_index: int = 0, state: JobState = JobState.READY,
         api_start_s: float = 0.0, category: str = "qa", tool: str | None = "search") -> Job:
    job = Job(job_id, 0.0, category=category, state=state, segment_index=segment_index,
              api_start_s=api_start_s, next_tool_category=tool)
    return job


def _learned() -> OnlineJobEstimator:
    est = OnlineJobEstimator()
    for d in (0.5, 1.0, 2.0, 4.0, 8.0):
        est.observe_api("search", d)
    for n in (100, 200, 300):
        est.observe_output(_job("seen"), n)
    return est


def _log_factors(sigma: float, n: int = 4000, seed: int = 0) -> np.ndarray:
    inner = _learned()
    noisy = PredictionErrorEstimator(inner, sigma, seed)
    return np.array([math.log(noisy.output_tokens(_job(f"j{i}")) / inner.output_tokens(_job(f"j{i}")))
                     for i in range(n)])


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_factors_are_log_normal_with_median_one_and_the_given_sigma(sigma):
    logs = _log_factors(sigma)
    assert abs(float(np.median(logs))) < 0.05 * sigma  # median factor 1
    assert float(np.std(logs)) == pytest.approx(sigma, rel=0.05)
    assert (logs > 0).mean() == pytest.approx(0.5, abs=0.03)  # as often too high as too low


def test_the_same_call_gets_the_same_factor_whatever_the_order_of_questions():
    inner = _learned()
    a = PredictionErrorEstimator(inner, 1.0, seed=7)
    b = PredictionErrorEstimator(inner, 1.0, seed=7)
    first = [a.output_tokens(_job(f"j{i}", 2)) for i in range(50)]
    again = [a.output_tokens(_job(f"j{i}", 2)) for i in range(50)]
    reverse = [b.output_tokens(_job(f"j{i}", 2)) for i in reversed(range(50))][::-1]
    assert first == again == reverse
    # The API call after segment 2 is the same call before the yield (segment index 2) and
    # during the wait (the index has moved on to 3): one factor for both.
    before = a.api_duration_s(_job("j1", 2, JobState.RUNNING))
    during = a.api_duration_s(_job("j1", 3, JobState.API_WAIT))
    assert before == during != inner.api_duration_s(_job("j1", 2))


def test_calls_segments_jobs_and_seeds_get_independent_factors():
    inner = _learned()
    noisy = PredictionErrorEstimator(inner, 1.0, seed=0)
    other_seed = PredictionErrorEstimator(inner, 1.0, seed=1)
    n = 3000
    out_seg0 = np.log([noisy.output_tokens(_job(f"j{i}", 0)) for i in range(n)])
    out_seg1 = np.log([noisy.output_tokens(_job(f"j{i}", 1)) for i in range(n)])
    api_seg0 = np.log([noisy.api_duration_s(_job(f"j{i}", 0)) for i in range(n)])
    seed1 = np.log([other_seed.output_tokens(_job(f"j{i}", 0)) for i in range(n)])
    for x, y in ((out_seg0, out_seg1), (out_seg0, api_seg0), (out_seg0, seed1)):
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.06
    assert len(set(out_seg0)) == n  # no two jobs share a factor


def test_a_larger_sigma_scales_the_same_error():
    """Each call's z is fixed by (seed, call): the σ values of a matrix differ in size only,
    so a policy's degradation with σ is not confounded with a new draw of the noise."""
    half, one, two = (_log_factors(s, n=200) for s in (0.5, 1.0, 2.0))
    assert np.allclose(one, 2 * half) and np.allclose(two, 2 * one)


def test_sigma_zero_returns_the_inner_estimates_exactly():
    inner = _learned()
    noisy = PredictionErrorEstimator(inner, 0.0, seed=3)
    for i in range(20):
        ready, waiting = _job(f"j{i}", i % 3), _job(f"j{i}", 1, JobState.API_WAIT, 10.0)
        assert noisy.output_tokens(ready) == inner.output_tokens(ready)
        assert noisy.api_duration_s(ready) == inner.api_duration_s(ready)
        assert noisy.remaining_api_s(waiting, 10.0 + i / 4) == inner.remaining_api_s(waiting, 10.0 + i / 4)
    assert list(noisy.api_duration_samples("search")) == inner.api_duration_samples("search")


def test_observations_reach_the_predictor_undistorted():
    inner, plain = OnlineJobEstimator(), OnlineJobEstimator()
    noisy = PredictionErrorEstimator(inner, 2.0, seed=0)
    for i, d in enumerate((0.3, 1.7, 4.2, 9.9)):
        noisy.observe_api("search", d)
        plain.observe_api("search", d)
        noisy.observe_output(_job(f"j{i}"), 50 * (i + 1))
        plain.observe_output(_job(f"j{i}"), 50 * (i + 1))
    assert inner.api_duration_samples("search") == plain.api_duration_samples("search")
    assert inner.output_tokens(_job("x")) == plain.output_tokens(_job("x"))


def test_remaining_time_counts_down_a_wrong_guess_of_the_duration():
    """With the oracle, a call of true duration d predicted as f·d has f·d − elapsed left."""
    trace = JobTrace("a", (Segment(100, 40, ToolCall("web", "search", 6.0, 30)),
                           Segment(0, 20, None)), arrival_s=0.0, category="qa")
    oracle = TraceOracle({"a": trace})
    noisy = PredictionErrorEstimator(oracle, 1.0, seed=0)
    waiting = _job("a", 1, JobState.API_WAIT, api_start_s=100.0)
    f = noisy.api_duration_s(waiting) / 6.0
    assert f != pytest.approx(1.0)
    for elapsed in (0.0, 1.0, 3.0, 12.0):
        assert noisy.remaining_api_s(waiting, 100.0 + elapsed) == pytest.approx(
            max(f * 6.0 - elapsed, 0.0))
    assert noisy.output_tokens(_job("a", 1)) / 20 != pytest.approx(f)  # its own factor


def test_samples_for_cdf_policies_are_distorted_per_sample_and_stay_sorted():
    inner = _learned()
    noisy = PredictionErrorEstimator(inner, 1.0, seed=0)
    samples = list(noisy.api_duration_samples("search"))
    assert samples == sorted(samples)
    assert samples != inner.api_duration_samples("search")
    assert samples == list(noisy.api_duration_samples("search"))  # the same every time
    # Median 1 per sample: the geometric mean of the distortion stays near 1 over many.
    many = OnlineJobEstimator()
    values = [0.1 * (i + 1) for i in range(500)]
    for v in values:
        many.observe_api("code", v)
    got = PredictionErrorEstimator(many, 1.0, seed=0).api_duration_samples("code")
    assert len(got) == len(many.api_duration_samples("code"))
    ratio = statistics.median(got) / statistics.median(many.api_duration_samples("code"))
    assert 0.8 < ratio < 1.25


def test_negative_or_infinite_sigma_is_refused():
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            PredictionErrorEstimator(OnlineJobEstimator(), bad)


# --- in the simulator ------------------------------------------------------------------------
# 80 InferCept-mix jobs at 4 jobs/s with the KV cache cut to 1,000 blocks: memory runs out, so
# the KV policies' estimate-driven choices matter.

@pytest.fixture(scope="module")
def pressure_jobs():
    return generate_mix(80, 0, qps=4.0, context_window=load_profile("gptj-6b-a100").context_window)


def _run(jobs, policy: str, sigma: float, predictor: str = "online"):
    sim = Simulation(list(jobs), load_profile("gptj-6b-a100"), policy, kv_blocks=1000,
                     predictor=predictor, prediction_error=sigma, error_seed=0)
    return sim, sim.run()


@pytest.mark.parametrize("predictor", ["online", "oracle"])
def test_wrong_predictions_change_astraea_decisions(pressure_jobs, predictor):
    _, exact = _run(pressure_jobs, "astraea", 0.0, predictor)
    _, wrong = _run(pressure_jobs, "astraea", 1.0, predictor)
    assert wrong.decision_counts != exact.decision_counts
    assert [r.finish_s for r in wrong.records] != [r.finish_s for r in exact.records]
    assert wrong.summary["jobs_completed"] == exact.summary["jobs_completed"] == 80


def test_vllm_fcfs_is_asked_for_estimates_but_decides_without_them(pressure_jobs):
    """vllm-fcfs orders by arrival and discards KV at every call: the wrapper is queried (the
    core predicts each segment's compute time on enqueue) yet no decision changes."""
    sim, wrong = _run(pressure_jobs, "vllm-fcfs", 2.0)
    _, exact = _run(pressure_jobs, "vllm-fcfs", 0.0)
    assert isinstance(sim.estimator, PredictionErrorEstimator) and sim.estimator.factors
    assert [r.finish_s for r in wrong.records] == [r.finish_s for r in exact.records]
    assert wrong.decision_counts == exact.decision_counts


def test_sigma_zero_leaves_the_simulator_estimator_unwrapped(pressure_jobs):
    sim = Simulation(list(pressure_jobs), load_profile("gptj-6b-a100"), "astraea",
                     prediction_error=0.0)
    assert isinstance(sim.estimator, OnlineJobEstimator)


# --- the bench matrix and its report ---------------------------------------------------------

def test_bench_runs_each_sigma_and_reports_degradation_against_sigma_zero(tmp_path, capsys):
    out = tmp_path / "pe.json"
    assert main(["bench", "--jobs", "40", "--qps", "4", "--policies", "vllm-fcfs,astraea",
                 "--prediction-error", "0,1", "--parallel", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["spec"]["prediction_error"] == [0.0, 1.0]
    assert sorted((r["policy"], r["prediction_error"]) for r in data["runs"]) == [
        ("astraea", 0.0), ("astraea", 1.0), ("vllm-fcfs", 0.0), ("vllm-fcfs", 1.0)]
    rows = {(r["policy"], r["prediction_error"]): r for r in data["rows"]}
    for (policy, _), row in rows.items():
        exact = rows[(policy, 0.0)]
        assert row["mean_jct_ratio_vs_sigma0"] == pytest.approx(
            row["mean_jct_s"] / exact["mean_jct_s"])
        assert row["p99_jct_ratio_vs_sigma0"] == pytest.approx(
            row["p99_jct_s"] / exact["p99_jct_s"])
    # vllm-fcfs's ratio to FCFS is taken at the same σ.
    assert rows[("vllm-fcfs", 1.0)]["mean_jct_ratio_vs_vllm-fcfs"] == 1.0
    printed = capsys.readouterr().out
    assert "QPS 4, prediction error sigma 1" in printed
    assert "astraea/best peer" in printed and "sigma 1" in printed
    assert main(["report", str(out)]) == 0
    assert "astraea/best peer" in capsys.readouterr().out


def test_bench_refuses_a_negative_sigma_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "pe.json"
    assert main(["bench", "--jobs", "5", "--qps", "2", "--policies", "astraea",
                 "--prediction-error", "0,-1", "--parallel", "1", "--out", str(out)]) == 2
    assert "--prediction-error" in capsys.readouterr().err
    assert not out.exists()


def test_rows_saved_before_prediction_error_existed_still_report():
    runs = [{"policy": p, "qps": 2.0, "seed": 0, "mean_jct_s": m, "p99_jct_s": 2 * m,
             "mean_idle_jct_s": 1.0, "mean_slowdown": 1.5}
            for p, m in (("vllm-fcfs", 10.0), ("astraea", 8.0))]
    rows = aggregate(runs)
    assert [r["prediction_error"] for r in rows] == [0.0, 0.0]
    assert format_degradation(rows) == ""
