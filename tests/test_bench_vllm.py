"""`astraea bench-vllm` end to end: a tiny run (4 jobs) through the CLI under both policies,
each on a live stack of processes with one vLLM worker; the report must be consistent (not
fast). The trace generator and the StackConfig fields are checked without vLLM."""

from __future__ import annotations

import json
import math

import pytest

from astraea.tools.bench.vllm_live import tiny_agent_trace
from astraea.tools.stack import StackConfig, StackError


def test_tiny_trace_is_seeded_and_small() -> None:
    jobs = tiny_agent_trace(20, seed=3, qps=4.0)
    assert jobs == tiny_agent_trace(20, seed=3, qps=4.0)
    assert jobs != tiny_agent_trace(20, seed=4, qps=4.0)
    for j in jobs:
        calls = [s.tool for s in j.segments if s.tool]
        assert 2 <= len(calls) <= 4 and j.segments[-1].tool is None
        assert 32 <= j.segments[0].prompt_tokens <= 200
        assert all(8 <= s.output_tokens <= 48 for s in j.segments)
        assert all(0.1 <= c.duration_s <= 1.0 for c in calls)
        assert j.total_tokens <= 48 * 32
    arrivals = [j.arrival_s for j in jobs]
    assert arrivals == sorted(arrivals)


def test_stack_config_backend() -> None:
    assert StackConfig().startup_timeout_s == 30.0
    cfg = StackConfig(backend="vllm", model="/m")
    assert cfg.startup_timeout_s == 120.0
    with pytest.raises(StackError, match="backend"):
        StackConfig(backend="tpu")
    with pytest.raises(StackError, match="vllm backend only"):
        StackConfig(model="/m")


def test_bench_vllm_cli(tmp_path, capsys) -> None:
    pytest.importorskip("vllm")
    from astraea.tools.cli.main import main

    out = tmp_path / "report.json"
    code = main(["bench-vllm", "--jobs", "4", "--qps", "8", "--log-dir", str(tmp_path / "logs"),
                 "--model", "tiny", "--profile", "gptj-6b-a100",
                 "--policies", "vllm-fcfs,infercept,astraea", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    runs = {r["policy"]: r for r in report["runs"]}
    assert list(runs) == ["vllm-fcfs", "infercept", "astraea"]
    for r in runs.values():
        assert not r["errors"]
        assert r["summary"]["jobs_completed"] == 4
        assert sum(r["kv_decisions"].values()) > 0  # the jobs paused for tools
        assert all(code == 0 for code in r["exit_codes"].values()), r["exit_codes"]
    ratio = runs["astraea"]["summary"]["mean_jct_s"] / runs["vllm-fcfs"]["summary"]["mean_jct_s"]
    assert math.isclose(report["ratio_astraea_over_fcfs"], ratio)
    assert f"astraea / vllm-fcfs = {ratio:.3f}" in printed
    peer = runs["astraea"]["summary"]["mean_jct_s"] / runs["infercept"]["summary"]["mean_jct_s"]
    assert math.isclose(report["astraea_over"]["infercept"], peer)
    assert f"astraea / infercept = {peer:.3f}" in printed
    assert "vllm-fcfs" in printed and "astraea" in printed


def test_model_names_resolve_and_unknown_sizes_are_refused(tmp_path) -> None:
    from worker.vllm.tiny_model import SIZES, build_tiny_model, resolve_model

    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a folder is taken as it is
    with pytest.raises(ValueError, match="unknown model size 'huge': one of tiny, small"):
        build_tiny_model(tmp_path, size="huge")
    # The small model is the tiny recipe, larger: same tokenizer, same context window.
    small, tiny = SIZES["small"], SIZES["tiny"]
    assert small["hidden_size"] // small["num_attention_heads"] >= 32  # CPU attention kernels
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads")
    assert {k: v for k, v in small.items() if k not in sizes} == \
        {k: v for k, v in tiny.items() if k not in sizes}
