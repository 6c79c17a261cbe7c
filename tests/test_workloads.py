"""Traces: the generated InferCept mix, the native JSONL format, InferCept's JSON, take_jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astraea.workloads import (
    JobTrace,
    Segment,
    ToolCall,
    TraceError,
    generate_mix,
    load_trace,
    read_infercept,
    read_native,
    take_jobs,
    with_poisson_arrivals,
    write_native,
)

# InferCept's Table 1 (ICML 2024): (API time s, API calls per job) means per category.
TABLE1 = {
    "math": (9e-5, 3.75),
    "qa": (0.69, 2.52),
    "ve": (0.09, 28.18),
    "chatbot": (28.6, 4.45),
    "image": (20.03, 6.91),
    "tts": (17.24, 6.91),
}


def good_job(job_id="j1", arrival=1.0) -> dict:
    return {"job_id": job_id, "arrival_s": arrival, "segments": [
        {"prompt_tokens": 812, "output_tokens": 40,
         "tool": {"name": "wiki_search", "category": "qa", "duration_s": 0.71, "result_tokens": 120}},
        {"prompt_tokens": 0, "output_tokens": 96, "tool": None}]}


def write_lines(tmp_path, lines, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# --- generator ------------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    a = generate_mix(50, seed=3, qps=2.0)
    b = generate_mix(50, seed=3, qps=2.0)
    c = generate_mix(50, seed=4, qps=2.0)
    assert a == b
    assert a != c


@pytest.fixture(scope="module")
def big_mix():
    return generate_mix(6000, seed=11)


def test_generator_covers_the_six_categories_evenly(big_mix):
    counts = {name: sum(j.category == name for j in big_mix) for name in TABLE1}
    assert set(j.category for j in big_mix) == set(TABLE1)
    for n in counts.values():  # uniform: 1000 each, binomial sd ≈ 29
        assert 850 < n < 1150


@pytest.mark.parametrize("category", list(TABLE1))
def test_generated_api_time_per_call_matches_the_design_table(big_mix, category):
    durations = [s.tool.duration_s for j in big_mix if j.category == category
                 for s in j.segments if s.tool]
    assert np.mean(durations) == pytest.approx(TABLE1[category][0], rel=0.06)
    assert all(d >= 0 for d in durations)


@pytest.mark.parametrize("category", list(TABLE1))
def test_generated_api_calls_per_job_match_the_design_table(big_mix, category):
    # A job has at least one call, which lifts the mean of wide categories a little (QA's
    # sd is 1.73 around 2.52); 15 % covers that and the sampling error.
    calls = [sum(1 for s in j.segments if s.tool) for j in big_mix if j.category == category]
    assert np.mean(calls) == pytest.approx(TABLE1[category][1], rel=0.15)
    assert min(calls) >= 1


@pytest.mark.parametrize("category, mean_tokens", [("qa", 1846), ("ve", 2185), ("math", 1422)])
def test_generated_context_tokens_match_the_design_table(big_mix, category, mean_tokens):
    totals = [j.total_tokens for j in big_mix if j.category == category]
    assert np.mean(totals) == pytest.approx(mean_tokens, rel=0.1)


def test_generated_jobs_fit_the_context_window_and_are_well_formed():
    jobs = generate_mix(600, seed=5, context_window=1024)
    for j in jobs:
        assert j.total_tokens <= 1024, j.job_id
        assert j.segments[0].prompt_tokens >= 1
        assert j.segments[-1].tool is None
        assert all(s.tool is not None for s in j.segments[:-1])
        assert all(s.output_tokens >= 1 for s in j.segments)
    assert len({j.job_id for j in jobs}) == 600


def test_generated_poisson_arrivals_have_the_requested_rate():
    jobs = generate_mix(3000, seed=2, qps=4.0)
    arrivals = np.array([j.arrival_s for j in jobs])
    assert np.all(np.diff(arrivals) > 0)
    assert np.mean(np.diff(arrivals, prepend=0.0)) == pytest.approx(0.25, rel=0.06)
    assert all(j.arrival_s is None for j in generate_mix(5, seed=2))


def test_with_poisson_arrivals_keeps_jobs_and_adds_increasing_times():
    jobs = generate_mix(2000, seed=1)
    timed = with_poisson_arrivals(jobs, qps=2.0, seed=9)
    assert [j.segments for j in timed] == [j.segments for j in jobs]
    gaps = np.diff([0.0] + [j.arrival_s for j in timed])
    assert np.all(gaps > 0) and np.mean(gaps) == pytest.approx(0.5, rel=0.08)
    assert timed == with_poisson_arrivals(jobs, qps=2.0, seed=9)


@pytest.mark.parametrize("kwargs", [{"num_jobs": 0, "seed": 0}, {"num_jobs": 5, "seed": 0, "qps": 0.0},
                                    {"num_jobs": 5, "seed": 0, "qps": -1.0}])
def test_generator_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_mix(**kwargs)


def test_trace_derived_quantities():
    job = JobTrace("x", (Segment(100, 10, ToolCall("t", "qa", 0.5, 30)),
                         Segment(5, 20, ToolCall("t", "qa", 1.5, 7)),
                         Segment(0, 3, None)))
    assert job.total_tokens == 100 + 10 + 30 + 5 + 20 + 7 + 3
    assert job.api_time_s == 2.0
    assert job.output_tokens == 33
    assert [job.new_tokens_before(i) for i in range(3)] == [100, 35, 7]


# --- native format --------------------------------------------------------------------------
def test_native_write_then_read_round_trips(tmp_path):
    jobs = generate_mix(40, seed=8, qps=3.0)
    path = tmp_path / "mix.jsonl"
    assert write_native(jobs, path) == 40
    back = read_native(path)
    assert [j.job_id for j in back] == [j.job_id for j in jobs]
    for a, b in zip(jobs, back):
        assert b.category == a.category
        assert b.arrival_s == pytest.approx(a.arrival_s, abs=1e-6)
        assert len(b.segments) == len(a.segments)
        for sa, sb in zip(a.segments, b.segments):
            assert (sb.prompt_tokens, sb.output_tokens) == (sa.prompt_tokens, sa.output_tokens)
            assert (sb.tool is None) == (sa.tool is None)
            if sa.tool:
                assert (sb.tool.name, sb.tool.category, sb.tool.result_tokens) == \
                    (sa.tool.name, sa.tool.category, sa.tool.result_tokens)
                assert sb.tool.duration_s == pytest.approx(sa.tool.duration_s, abs=1e-6)
    # A second round trip is exact.
    write_native(back, tmp_path / "again.jsonl")
    assert read_native(tmp_path / "again.jsonl") == back
    assert load_trace(path) == back


def test_native_reads_the_design_example(tmp_path):
    path = write_lines(tmp_path, [good_job("j17", 3.2), "", {"job_id": "j18", "segments": [
        {"prompt_tokens": 5, "output_tokens": 1, "tool": None}]}])
    jobs = read_native(path)
    j = jobs[0]
    assert (j.job_id, j.arrival_s, j.category) == ("j17", 3.2, "qa")  # category from the tool
    assert j.segments[0].tool == ToolCall("wiki_search", "qa", 0.71, 120)
    assert j.total_tokens == 812 + 40 + 120 + 96
    assert jobs[1].arrival_s is None and jobs[1].category == "unknown"


def _mutate(fn):
    obj = good_job("bad-job")
    fn(obj)
    return obj


BAD_NATIVE = [
    ("missing job_id", lambda o: o.pop("job_id"), "job_id"),
    ("empty job_id", lambda o: o.update(job_id=""), "job_id"),
    ("negative arrival", lambda o: o.update(arrival_s=-1), "arrival_s"),
    ("string arrival", lambda o: o.update(arrival_s="soon"), "arrival_s"),
    ("no segments", lambda o: o.update(segments=[]), "segments"),
    ("segments not a list", lambda o: o.update(segments={}), "segments"),
    ("missing output", lambda o: o["segments"][1].pop("output_tokens"), "output_tokens"),
    ("zero output", lambda o: o["segments"][0].update(output_tokens=0), "output_tokens"),
    ("float prompt", lambda o: o["segments"][0].update(prompt_tokens=8.5), "prompt_tokens"),
    ("bool prompt", lambda o: o["segments"][0].update(prompt_tokens=True), "prompt_tokens"),
    ("empty first prompt", lambda o: o["segments"][0].update(prompt_tokens=0), "prompt_tokens"),
    ("negative later prompt", lambda o: o["segments"][1].update(prompt_tokens=-3), "prompt_tokens"),
    ("tool on last segment", lambda o: o["segments"][1].update(tool=o["segments"][0]["tool"]), "tool"),
    ("missing tool", lambda o: o["segments"][0].update(tool=None), "tool"),
    ("tool not an object", lambda o: o["segments"][0].update(tool="wiki"), "tool"),
    ("negative duration", lambda o: o["segments"][0]["tool"].update(duration_s=-0.1), "duration_s"),
    ("missing result", lambda o: o["segments"][0]["tool"].pop("result_tokens"), "result_tokens"),
    ("category not string", lambda o: o.update(category=7), "category"),
]


@pytest.mark.parametrize("what, mutate, field", BAD_NATIVE, ids=[b[0] for b in BAD_NATIVE])
def test_malformed_native_trace_names_file_line_and_field(tmp_path, what, mutate, field):
    path = write_lines(tmp_path, [good_job("ok-1"), good_job("ok-2"), _mutate(mutate)])
    with pytest.raises(TraceError) as info:
        read_native(path)
    msg = str(info.value)
    assert f"{path}:3" in msg
    assert field in msg


def test_native_invalid_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path, [good_job("a"), '{"job_id": "b", "segments": [}'])
    with pytest.raises(TraceError, match=rf"{path}:2: invalid JSON"):
        read_native(path)


def test_native_line_that_is_not_an_object_is_rejected(tmp_path):
    path = write_lines(tmp_path, [good_job("a"), "[1, 2]"])
    with pytest.raises(TraceError, match=rf"{path}:2"):
        read_native(path)


def test_native_duplicate_job_id_names_the_second_line(tmp_path):
    path = write_lines(tmp_path, [good_job("a"), good_job("b"), good_job("a")])
    with pytest.raises(TraceError) as info:
        read_native(path)
    assert f"{path}:3" in str(info.value) and "'a'" in str(info.value) and "job_id" in str(info.value)


def test_native_empty_trace_is_rejected(tmp_path):
    path = write_lines(tmp_path, ["", "  "])
    with pytest.raises(TraceError, match="no jobs"):
        read_native(path)


# --- InferCept format -----------------------------------------------------------------------
INFERCEPT_DOC = {
    "7": [
        {"prompt_tokens": 500, "completion_tokens": 30, "api_time": 0.25, "api_token_length": 12},
        {"prompt_tokens": 542, "completion_tokens": 18, "api_time": 2, "api_token_length": 0},
        {"prompt_tokens": 560, "completion_tokens": 9},
    ],
    "8": [{"prompt_tokens": 64, "completion_tokens": 4}],
}


def test_infercept_json_reads_as_the_benchmark_loader_replays_it(write_json):
    path = write_json("infercept.json", INFERCEPT_DOC)
    jobs = read_infercept(path)
    assert [j.job_id for j in jobs] == ["7", "8"]
    j = jobs[0]
    assert j.arrival_s is None and j.category == "unknown"
    # Later segments' prompt_tokens are ignored: their context is already in the job.
    assert [s.prompt_tokens for s in j.segments] == [500, 0, 0]
    assert [s.output_tokens for s in j.segments] == [30, 18, 9]
    assert [(s.tool.duration_s, s.tool.result_tokens) for s in j.segments[:2]] == [(0.25, 12), (2.0, 0)]
    assert j.segments[2].tool is None
    assert j.total_tokens == 500 + 30 + 12 + 18 + 0 + 9
    assert load_trace(path) == jobs  # detected as InferCept JSON
    assert jobs[1].segments == (Segment(64, 4, None),)


BAD_INFERCEPT = [
    ("missing completion", lambda d: d["7"][1].pop("completion_tokens"), "'7'", "completion_tokens"),
    ("zero first prompt", lambda d: d["7"][0].update(prompt_tokens=0), "'7'", "prompt_tokens"),
    ("negative api time", lambda d: d["7"][0].update(api_time=-1), "'7'", "api_time"),
    ("missing api time", lambda d: d["7"][1].pop("api_time"), "'7'", "api_time"),
    ("string result", lambda d: d["7"][0].update(api_token_length="12"), "'7'", "api_token_length"),
    ("empty job", lambda d: d.update({"9": []}), "'9'", "segment"),
    ("segment not object", lambda d: d["8"].insert(0, 5), "'8'", "segment 0"),
]


@pytest.mark.parametrize("what, mutate, job, field", BAD_INFERCEPT, ids=[b[0] for b in BAD_INFERCEPT])
def test_malformed_infercept_trace_names_file_job_and_field(write_json, what, mutate, job, field):
    doc = json.loads(json.dumps(INFERCEPT_DOC))
    mutate(doc)
    path = write_json("bad.json", doc)
    with pytest.raises(TraceError) as info:
        read_infercept(path)
    msg = str(info.value)
    assert path in msg and f"job {job}" in msg and field in msg


def test_infercept_invalid_json_and_wrong_shape(tmp_path, write_json):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "1": [\n {"prompt_tokens": 3,,}]}')
    with pytest.raises(TraceError, match=rf"{broken}:3: invalid JSON"):
        read_infercept(broken)
    with pytest.raises(TraceError, match="non-empty object"):
        read_infercept(write_json("list.json", [1, 2]))


def test_load_trace_reports_a_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TraceError, match=rf"{missing}: no such trace file"):
        load_trace(missing)


def test_load_trace_errors_from_native_lines_keep_their_location(tmp_path):
    bad = good_job("x")
    bad["segments"][0]["output_tokens"] = -1
    path = write_lines(tmp_path, [good_job("a"), bad])
    with pytest.raises(TraceError, match=rf"{path}:2: segments\[0\]: field 'output_tokens'"):
        load_trace(path)


# --- take_jobs ------------------------------------------------------------------------------
def test_take_jobs_takes_a_prefix_in_file_order():
    jobs = generate_mix(10, seed=0, qps=1.0)
    assert take_jobs(jobs, 4) == jobs[:4]


def test_take_jobs_cycles_with_fresh_unique_ids_and_later_arrivals():
    jobs = generate_mix(10, seed=0, qps=1.0)
    out = take_jobs(jobs, 25)
    assert len(out) == 25
    assert len({j.job_id for j in out}) == 25
    assert out[:10] == jobs
    for i, j in enumerate(out[10:], start=10):
        src = jobs[i % 10]
        assert j.segments == src.segments and j.category == src.category
        assert j.job_id not in {x.job_id for x in jobs}
    arrivals = [j.arrival_s for j in out]
    assert all(b > a for a, b in zip(arrivals, arrivals[1:]))  # cycles come after the file


def test_take_jobs_cycles_untimed_traces_without_arrivals():
    jobs = generate_mix(3, seed=0)
    out = take_jobs(jobs, 7)
    assert len({j.job_id for j in out}) == 7
    assert all(j.arrival_s is None for j in out)


def test_take_jobs_rejects_a_job_longer_than_the_context_window_naming_it():
    jobs = generate_mix(5, seed=0, qps=1.0)
    longest = max(jobs, key=lambda j: j.total_tokens)
    with pytest.raises(TraceError) as info:
        take_jobs(jobs, 5, context_window=longest.total_tokens - 1)
    msg = str(info.value)
    assert repr(longest.job_id) in msg and str(longest.total_tokens) in msg
    assert str(longest.total_tokens - 1) in msg
    assert len(take_jobs(jobs, 5, context_window=longest.total_tokens)) == 5
