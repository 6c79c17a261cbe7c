"""`astraea bench-vllm` end to end: a tiny run (4 jobs) through the CLI under both policies,
each on a live stack of processes with one vLLM worker; the report must be consistent (not
fast). The trace generator and the StackConfig fields are checked without vLLM."""

from __future__ import annotations

import json
import math
from statistics import fmean

import pytest

from astraea.profile import load_profile, step_time_ratio
from astraea.telemetry.span_files import load_spans
from astraea.telemetry.spans import JCT_S, JOB
from astraea.tools.bench.vllm_live import timed_steps
from astraea.tools.stack import StackConfig, StackError
from astraea.workloads import generate_tiny_agent


def test_tiny_trace_is_seeded_and_small() -> None:
    jobs = generate_tiny_agent(20, seed=3, qps=4.0)
    assert jobs == generate_tiny_agent(20, seed=3, qps=4.0)
    assert jobs != generate_tiny_agent(20, seed=4, qps=4.0)
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
    assert StackConfig().startup_timeout_s == 60.0
    cfg = StackConfig(backend="vllm", model="/m")
    assert cfg.startup_timeout_s == 120.0
    with pytest.raises(StackError, match="backend"):
        StackConfig(backend="tpu")
    with pytest.raises(StackError, match="vllm backend only"):
        StackConfig(model="/m")
    with pytest.raises(StackError, match="vllm backend only"):
        StackConfig(dtype="float32")


def control_plane_mean_jct(span_dir) -> float:
    """The mean JCT the control plane itself measured (StartJob to the job's end), from the
    job spans it wrote: a measurement independent of the replaying client's."""
    jcts = [s.attributes[JCT_S] for s in load_spans(str(span_dir))
            if s.name == JOB and s.service == "astraea-control-plane"]
    assert len(jcts) == 4, jcts
    return fmean(jcts)


@pytest.mark.timeout(900)  # three vLLM stacks one after the other: ~90 s alone, more in CI
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
        # The worker runs in the dtype the bench asks for (float32), not vLLM's "auto"
        # (bfloat16 on CPU): the dtype a measured profile is taken in too.
        worker_out = tmp_path / "logs" / r["policy"] / "logs" / "worker-w1.out"
        assert "dtype=torch.float32" in worker_out.read_text()
        # The worker's timed steps, saved by the predictor, set against the cost model.
        state = json.loads((tmp_path / "logs" / r["policy"] / "predictor-state.json").read_text())
        samples = state["step_samples"]
        assert samples and r["step_time_ratio"]["steps"] == len(samples)
        gptj = load_profile("gptj-6b-a100")
        assert r["step_time_ratio"]["total"] == pytest.approx(
            sum(d for _, _, d in samples) / sum(gptj.step_time_s(t, c) for t, c, _ in samples))
        assert f"{r['step_time_ratio']['total']:.2f}" in next(
            line for line in printed.splitlines() if line.startswith(r["policy"] + " "))
    ratio = runs["astraea"]["summary"]["mean_jct_s"] / runs["vllm-fcfs"]["summary"]["mean_jct_s"]
    assert math.isclose(report["ratio_astraea_over_fcfs"], ratio)
    assert f"astraea / vllm-fcfs = {ratio:.3f}" in printed
    peer = runs["astraea"]["summary"]["mean_jct_s"] / runs["infercept"]["summary"]["mean_jct_s"]
    assert math.isclose(report["astraea_over"]["infercept"], peer)
    assert f"astraea / infercept = {peer:.3f}" in printed
    assert "vllm-fcfs" in printed and "astraea" in printed
    # The client's figures against the control plane's own: the client's JCT runs from the
    # job's scheduled arrival to the EndJob answer, the control plane's from StartJob to the
    # job's end, so the client's is longer by its start-up lag and a round trip, no more.
    server = {p: control_plane_mean_jct(tmp_path / "logs" / p / "traces") for p in runs}
    for policy, r in runs.items():
        client = r["summary"]["mean_jct_s"]
        # (Measured: 6-22 ms longer on means of 2.3-5.8 s.)
        assert server[policy] - 0.01 <= client <= server[policy] + max(0.15, 0.03 * client), (
            policy, client, server[policy])
    assert report["ratio_astraea_over_fcfs"] == pytest.approx(
        server["astraea"] / server["vllm-fcfs"], rel=0.15)
    assert report["astraea_over"]["infercept"] == pytest.approx(
        server["astraea"] / server["infercept"], rel=0.15)


def test_step_time_ratio_sets_timed_steps_against_the_profile(tmp_path) -> None:
    gptj = load_profile("gptj-6b-a100")
    steps = [(256, 4096), (8, 20000), (32, 1000)]
    state = tmp_path / "state.json"
    # Twice the price for each step but the last, which took its price exactly.
    durations = [2 * gptj.step_time_s(*steps[0]), 2 * gptj.step_time_s(*steps[1]),
                 gptj.step_time_s(*steps[2])]
    state.write_text(json.dumps({"step_samples": [[t, c, d] for (t, c), d in
                                                  zip(steps, durations, strict=True)]}))
    got = step_time_ratio(gptj, json.loads(state.read_text())["step_samples"])
    assert got["steps"] == 3 and got["median"] == pytest.approx(2.0)
    assert got["total"] == pytest.approx(sum(durations) / sum(gptj.step_time_s(*s) for s in steps))
    assert step_time_ratio(gptj, []) == {}
    assert timed_steps(tmp_path / "missing.json") == []


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
