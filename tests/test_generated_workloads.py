"""The `heavy-tail` and `chat` generated workloads: their distributions, determinism and limits,
and that `trace gen --shape` and `bench --workload` take them by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from astraea.tools.cli.main import main
from astraea.workloads import (
    GENERATED,
    generate_chat,
    generate_heavy_tail,
    generate_tiny_agent,
    load_trace,
)
from astraea.workloads.heavy_tail import CATEGORIES
from astraea.workloads.tiny_agent import MAX_JOB_TOKENS


def calls(jobs, category=None):
    return [s.tool for j in jobs for s in j.segments
            if s.tool and (category is None or s.tool.category == category)]


@pytest.fixture(scope="module")
def heavy():
    return generate_heavy_tail(3000, seed=1)


@pytest.mark.parametrize("generate", [generate_heavy_tail, generate_chat])
def test_same_seed_same_trace_other_seed_other_trace(generate):
    a, b = generate(50, seed=7, qps=2.0), generate(50, seed=7, qps=2.0)
    assert a == b
    assert generate(50, seed=8, qps=2.0) != a


def test_heavy_tail_has_five_categories_whose_means_span_1000x(heavy):
    names = {j.category for j in heavy}
    assert names == {c[0] for c in CATEGORIES}
    means = {}
    for name, _, mean_s in CATEGORIES:
        durations = [c.duration_s for c in calls(heavy, name)]
        means[name] = float(np.mean(durations))
        # σ = 1.5 leaves the sample mean within ~15 % of the category mean at this size.
        assert means[name] == pytest.approx(mean_s, rel=0.2), name
    assert max(means.values()) / min(means.values()) == pytest.approx(1000, rel=0.3)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_heavy_tail_durations_are_log_normal_with_the_requested_sigma(sigma):
    jobs = generate_heavy_tail(2000, seed=2, sigma=sigma)
    mean_s = dict((c[0], c[2]) for c in CATEGORIES)["search"]
    logs = np.log([c.duration_s for c in calls(jobs, "search")])
    assert float(np.std(logs)) == pytest.approx(sigma, rel=0.08)
    # Median of a log-normal with mean m: m·exp(−σ²/2).
    assert math.exp(float(np.median(logs))) == pytest.approx(
        mean_s * math.exp(-sigma * sigma / 2), rel=0.15)


def test_heavy_tail_jobs_look_like_infercept_jobs_and_fit_the_window():
    jobs = generate_heavy_tail(2000, seed=3, context_window=2048)
    assert all(j.total_tokens <= 2048 for j in jobs)
    assert all(j.segments[-1].tool is None and all(s.tool for s in j.segments[:-1]) for j in jobs)
    per_job = np.mean([len(j.segments) - 1 for j in jobs])
    assert 4.0 < per_job < 6.0
    assert 1000 < np.mean([j.total_tokens for j in generate_heavy_tail(2000, seed=3)]) < 1900


@pytest.mark.parametrize("kwargs", [{"sigma": 0.5}, {"sigma": 2.5}, {"num_jobs": 0},
                                    {"qps": 0.0}, {"context_window": 10}])
def test_heavy_tail_rejects_bad_arguments(kwargs):
    args = {"num_jobs": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        generate_heavy_tail(**args)


def test_chat_waits_are_minutes_long_human_replies_mixed_with_short_tool_calls():
    jobs = generate_chat(2000, seed=4)
    human = [c.duration_s for c in calls(jobs, "human")]
    tool = [c.duration_s for c in calls(jobs, "tool")]
    assert float(np.median(human)) == pytest.approx(60.0, rel=0.1)
    assert float(np.median(tool)) == pytest.approx(0.3, rel=0.15)
    assert np.mean(np.array(human) > 60.0 * 3) > 0.05  # minutes-long replies are common
    assert len(tool) > 0.5 * len(human)  # tool calls are mixed in, not rare
    for job in jobs:
        assert job.segments[-1].tool is None  # the assistant's last reply ends it
        assert all(s.tool is not None for s in job.segments[:-1])


def test_chat_conversations_fit_a_small_window():
    jobs = generate_chat(500, seed=5, context_window=1024)
    assert all(j.total_tokens <= 1024 for j in jobs)
    with pytest.raises(ValueError):
        generate_chat(5, seed=0, context_window=8)


def test_tiny_agent_jobs_are_the_same_with_or_without_arrivals():
    timed = generate_tiny_agent(30, seed=1, qps=4.0)
    untimed = generate_tiny_agent(30, seed=1)
    assert all(j.arrival_s is None for j in untimed)
    assert [j.segments for j in untimed] == [j.segments for j in timed]
    assert all(j.total_tokens <= MAX_JOB_TOKENS for j in timed + untimed)
    with pytest.raises(ValueError, match="context_window"):
        generate_tiny_agent(5, seed=0, context_window=512)
    with pytest.raises(ValueError, match="qps"):
        generate_tiny_agent(5, seed=0, qps=0.0)


@pytest.mark.parametrize("shape", ["heavy-tail", "chat", "tiny-agent"])
def test_trace_gen_writes_the_shape_and_bench_runs_it_by_name(tmp_path, shape):
    assert shape in GENERATED
    out = tmp_path / f"{shape}.jsonl"
    assert main(["trace", "gen", "--shape", shape, "--jobs", "20", "--qps", "1", "--seed", "2",
                 "--out", str(out)]) == 0
    written = load_trace(out)
    assert [j.job_id for j in written] == [j.job_id for j in GENERATED[shape](20, 2, qps=1.0)]
    assert main(["bench", "--workload", shape, "--jobs", "20", "--qps", "2",
                 "--policies", "thunderagent,mars", "--parallel", "1"]) == 0
