"""The `astraea` command line, run in-process: bench, trace gen, profiles, and its errors."""

from __future__ import annotations

import json

import pytest

from astraea.tools.cli.main import main
from astraea.workloads import generate_mix, load_trace, write_native

ROW_KEYS = {"policy", "qps", "mean_jct_s", "p50_jct_s", "p90_jct_s", "p99_jct_s", "max_jct_s",
            "mean_slowdown", "jobs_completed"}


def test_bench_writes_rows_with_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--jobs", "30", "--qps", "2", "--policies", "vllm-fcfs,astraea",
                 "--parallel", "1", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["policy"] for r in rows] == ["vllm-fcfs", "astraea"]
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["qps"] == 2.0
        assert row["jobs_completed"] == 30
        assert 0 < row["p50_jct_s"] <= row["p90_jct_s"] <= row["p99_jct_s"] <= row["max_jct_s"]
        assert row["mean_jct_s"] <= row["max_jct_s"]
        assert row["mean_slowdown"] >= 1.0
    assert data["spec"]["jobs"] == 30 and data["spec"]["policies"] == ["vllm-fcfs", "astraea"]
    assert len(data["runs"]) == 2
    printed = capsys.readouterr().out
    assert "vllm-fcfs" in printed and "astraea" in printed  # the table


def test_bench_reports_progress_on_the_current_stderr(tmp_path, capsys):
    """Progress lines ("[1/1] astraea qps=2 seed=0: ...") belong on stderr as it is when the
    command runs, like every other message of the command."""
    assert main(["bench", "--jobs", "8", "--qps", "2", "--policies", "astraea", "--parallel", "1"]) == 0
    err = capsys.readouterr().err
    assert "astraea bench: 1 policies" in err
    assert "[1/1] astraea qps=2 seed=0" in err


def test_bench_runs_every_qps_and_seed_with_the_same_jobs_for_every_policy(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--jobs", "12", "--qps", "1,3", "--seeds", "0-1", "--policies",
                 "vllm-fcfs,infercept", "--parallel", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["policy"], r["qps"], r["seed"]) for r in data["runs"]} == {
        (p, q, s) for p in ("vllm-fcfs", "infercept") for q in (1.0, 3.0) for s in (0, 1)}
    for row in data["rows"]:
        assert row["jobs_completed"] == 24  # two seeds × 12 jobs
        assert sorted(row["seeds"]) == [0, 1]


def test_bench_replays_a_trace_file_with_its_own_arrivals(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    write_native(generate_mix(15, seed=4, qps=2.0), trace)
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", str(trace), "--jobs", "15", "--policies", "astraea",
                 "--parallel", "1", "--out", str(out)]) == 0
    assert "--qps is ignored" in capsys.readouterr().err
    (row,) = json.loads(out.read_text())["rows"]
    assert row["qps"] is None and row["jobs_completed"] == 15


def test_trace_gen_writes_a_file_that_load_trace_reads(tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["trace", "gen", "--jobs", "25", "--qps", "2", "--seed", "3", "--out", str(out)]) == 0
    jobs = load_trace(out)
    expected = generate_mix(25, 3, qps=2.0, context_window=4096)
    assert [j.job_id for j in jobs] == [j.job_id for j in expected]
    assert [j.segments[0].prompt_tokens for j in jobs] == [j.segments[0].prompt_tokens for j in expected]
    assert [j.total_tokens for j in jobs] == [j.total_tokens for j in expected]
    assert all(j.arrival_s is not None for j in jobs)


def test_trace_gen_without_qps_writes_a_trace_without_arrivals(tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["trace", "gen", "--jobs", "5", "--out", str(out)]) == 0
    assert all(j.arrival_s is None for j in load_trace(out))


def test_profiles_lists_the_builtins(capsys):
    assert main(["profiles"]) == 0
    text = capsys.readouterr().out
    for name in ("gptj-6b-a100", "vicuna-13b-2xa100", "llama3-8b-h100"):
        assert name in text


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("astraea: error: ") or "\nastraea: error: " in err, err
    return err


def test_missing_trace_file_is_an_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"
    err = _error(capsys, ["bench", "--workload", str(missing), "--jobs", "5", "--qps", "1",
                          "--policies", "astraea", "--parallel", "1"])
    assert str(missing) in err


def test_malformed_trace_file_is_an_error_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"job_id": "a", "segments": [{"prompt_tokens": 5, "output_tokens": 0, "tool": null}]}\n')
    err = _error(capsys, ["bench", "--workload", str(bad), "--jobs", "5", "--qps", "1",
                          "--policies", "astraea", "--parallel", "1"])
    assert f"{bad}:1" in err and "output_tokens" in err


def test_unknown_policy_is_an_error(capsys):
    err = _error(capsys, ["bench", "--jobs", "5", "--qps", "1", "--policies", "astraea,lottery",
                          "--parallel", "1"])
    assert "lottery" in err


def test_unknown_profile_is_an_error(capsys):
    err = _error(capsys, ["bench", "--jobs", "5", "--qps", "1", "--profile", "tpu-v9",
                          "--policies", "astraea", "--parallel", "1"])
    assert "tpu-v9" in err


@pytest.mark.parametrize("setting, needle", [
    ("mlfq.num_levels", "section.field=value"),  # no '='
    ("mlfq.no_such_knob=3", "mlfq.no_such_knob"),
    ("nosection.x=1", "nosection.x"),
    ("mlfq.num_levels=three", "three"),
    ("kv.reclaim_for_ready_jobs=maybe", "maybe"),
])
def test_bad_set_override_is_an_error(capsys, setting, needle):
    err = _error(capsys, ["bench", "--jobs", "5", "--qps", "1", "--policies", "astraea",
                          "--parallel", "1", "--set", setting])
    assert needle in err


def test_trace_gen_with_unknown_profile_is_an_error(tmp_path, capsys):
    _error(capsys, ["trace", "gen", "--jobs", "5", "--profile", "nope", "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_bench_errors_do_not_write_the_output_file(tmp_path, capsys):
    out = tmp_path / "never.json"
    _error(capsys, ["bench", "--jobs", "5", "--qps", "1", "--policies", "nope", "--parallel", "1",
                    "--out", str(out)])
    assert not out.exists()


def test_bench_plot_and_report_read_back_what_bench_wrote(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "jct.png"
    assert main(["bench", "--jobs", "20", "--qps", "1,2", "--policies", "vllm-fcfs,astraea",
                 "--parallel", "1", "--out", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["report", str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    astraea_at_2 = next(r for r in rows if r["policy"] == "astraea" and r["qps"] == 2.0)
    assert f"{astraea_at_2['mean_jct_s']:.1f}" in table  # the summary quotes the saved rows
    assert "QPS 1:" in table and "QPS 2:" in table  # the criteria check, per QPS


def test_report_of_a_file_that_is_not_bench_output_is_an_error(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["report", str(bad)]) == 2
    assert "not a results file" in capsys.readouterr().err


def test_trace_stats_reports_each_category_of_a_trace(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    assert main(["trace", "gen", "--jobs", "120", "--seed", "3", "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["trace", "stats", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    jobs = load_trace(path)
    counts = {line.split()[0]: int(line.split()[1]) for line in lines}
    expected = {}
    for job in jobs:
        expected[job.category] = expected.get(job.category, 0) + 1
    assert counts == expected
