"""`astraea bench` says when jobs never finished: a job whose context outgrows every worker's
KV pool never runs, and means over the finished jobs alone would otherwise pass as complete."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from astraea.tools.bench.run import BenchSpec, run_matrix

ROOT = Path(__file__).resolve().parents[1]


def two_job_trace(tmp_path) -> Path:
    """A 100-token job and a 2,000-token one (125 blocks of 16), as a native trace."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(job) + "\n" for job in [
        {"job_id": "fits", "arrival_s": 0.0,
         "segments": [{"prompt_tokens": 100, "output_tokens": 10, "tool": None}]},
        {"job_id": "too-big", "arrival_s": 0.5,
         "segments": [{"prompt_tokens": 2000, "output_tokens": 10, "tool": None}]},
    ]))
    return trace


def test_a_job_larger_than_the_kv_pool_is_reported_as_never_finished(tmp_path):
    profile = json.loads((ROOT / "astraea/profiles/gptj-6b-a100.json").read_text())
    # About 800 tokens of KV (50 blocks of 16): the second job's 2,000-token prompt never fits.
    profile["gpu_memory_bytes"] = (12.1e9 + 800 * 458752) / 0.9
    profile_path = tmp_path / "small-pool.json"
    profile_path.write_text(json.dumps(profile))
    trace = two_job_trace(tmp_path)
    spec = BenchSpec(workload=str(trace), profile=str(profile_path),
                     policies=("vllm-fcfs", "astraea"), qps=(None,), jobs=2, seeds=(0,))
    log = io.StringIO()
    runs = run_matrix(spec, parallel=1, log=log)
    assert [(r["policy"], r["jobs"], r["jobs_completed"]) for r in runs] == [
        ("vllm-fcfs", 2, 1), ("astraea", 2, 1)]
    warnings = [line for line in log.getvalue().splitlines() if "never finished" in line]
    assert warnings == [
        "  warning: 1 of 2 jobs never finished (vllm-fcfs); the JCT figures cover only the "
        "finished ones",
        "  warning: 1 of 2 jobs never finished (astraea); the JCT figures cover only the "
        "finished ones"]


def test_no_warning_when_every_job_finishes():
    spec = BenchSpec(workload="infercept", profile="gptj-6b-a100", policies=("astraea",),
                     qps=(2.0,), jobs=20, seeds=(0,))
    log = io.StringIO()
    (run,) = run_matrix(spec, parallel=1, log=log)
    assert run["jobs_completed"] == 20
    assert "never finished" not in log.getvalue()


def test_kv_blocks_sizes_every_worker_pool_and_is_checked(tmp_path):
    # The same two jobs on the built-in profile, its pool cut to 50 blocks by --kv-blocks:
    # the 2,000-token prompt never fits; with a pool of 200 blocks both finish.
    trace = two_job_trace(tmp_path)
    done = {}
    for blocks in (50, 200):
        spec = BenchSpec(workload=str(trace), profile="gptj-6b-a100", policies=("astraea",),
                         qps=(None,), jobs=2, seeds=(0,), kv_blocks=blocks)
        (run,) = run_matrix(spec, parallel=1, log=io.StringIO())
        done[blocks] = run["jobs_completed"]
        assert spec.to_dict()["kv_blocks"] == blocks
    assert done == {50: 1, 200: 2}
    with pytest.raises(ValueError, match="--kv-blocks must be at least 1"):
        run_matrix(BenchSpec(workload="infercept", profile="gptj-6b-a100",
                             policies=("astraea",), qps=(1.0,), jobs=2, seeds=(0,),
                             kv_blocks=0), parallel=1, log=io.StringIO())
