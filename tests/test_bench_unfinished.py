"""`astraea bench` says when jobs never finished: a job whose context outgrows every worker's
KV pool never runs, and means over the finished jobs alone would otherwise pass as complete."""

from __future__ import annotations

import io
import json
from pathlib import Path

from astraea.tools.bench.run import BenchSpec, run_matrix

ROOT = Path(__file__).resolve().parents[1]


def test_a_job_larger_than_the_kv_pool_is_reported_as_never_finished(tmp_path):
    profile = json.loads((ROOT / "astraea/profiles/gptj-6b-a100.json").read_text())
    # About 800 tokens of KV (50 blocks of 16): the second job's 2,000-token prompt never fits.
    profile["gpu_memory_bytes"] = (12.1e9 + 800 * 458752) / 0.9
    profile_path = tmp_path / "small-pool.json"
    profile_path.write_text(json.dumps(profile))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(job) + "\n" for job in [
        {"job_id": "fits", "arrival_s": 0.0,
         "segments": [{"prompt_tokens": 100, "output_tokens": 10, "tool": None}]},
        {"job_id": "too-big", "arrival_s": 0.5,
         "segments": [{"prompt_tokens": 2000, "output_tokens": 10, "tool": None}]},
    ]))
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
