"""The client SDK, `astraea replay` and `astraea compare-live` over real gRPC on loopback,
with the control plane and simulated workers in-process."""

from __future__ import annotations

import asyncio
import json
from statistics import fmean

import grpc
import pytest
from conftest import SMALL_48

import astraea.tools.replay as replay_module
from astraea.client import AgentClient, AstraeaError, AsyncAgentClient, FinishReason
from astraea.client.client import _Collector
from astraea.profile import load_profile
from astraea.tools.cli import main as cli
from astraea.tools.replay import local_stack
from astraea.tools.sim.simulator import Simulation
from astraea.v1 import agent_pb2
from astraea.workloads import generate_mix, generate_tiny_agent, write_native
from control_plane.core.policies import POLICIES
from worker.sim.backend import placeholder_token

TIME_SCALE = 0.002


def test_async_agent_loop_returns_requested_tokens() -> None:
    async def main() -> None:
        async with local_stack(workers=1, time_scale=TIME_SCALE) as st, \
                AsyncAgentClient(st.address) as client:
            job = await client.start_job("loop", category="test")
            assert job == "loop"
            plan = [(30, "search"), (12, "calc"), (7, None)]
            results = []
            for i, (n, tool) in enumerate(plan):
                seg = await client.run_segment(job, prompt_token_ids=[1] * (50 if i == 0 else 9),
                                               max_tokens=n, temperature=0.0,
                                               next_tool_category=tool)
                results.append(seg)
                assert seg.tokens == [placeholder_token(job, k) for k in range(n)]
                assert seg.timings.decode_tokens == n and seg.timings.duration_s > 0
                assert seg.segment_index == i
                if seg.calls_tool:
                    async with client.tool_call(job, tool) as call:
                        await asyncio.sleep(0.002)
                    assert call.observed_duration_s > 0
            assert [r.finish_reason for r in results] == [
                FinishReason.TOOL_CALL, FinishReason.TOOL_CALL, FinishReason.LENGTH]
            status = await client.end_job(job)
            assert status.generated_tokens == 49 and status.segment_index == 3

            # Streaming: chunks arrive in order and add up to the collected result.
            job2 = await client.start_job()
            assert job2  # assigned by the server
            stream = client.stream_segment(job2, prompt_text="hello there", max_tokens=20)
            chunks = [c async for c in stream]
            assert chunks and chunks[0].first_index == 0
            assert [t for c in chunks for t in c.token_ids] == stream.result.tokens
            assert len(stream.result.tokens) == 20
            await client.cancel_job(job2, "test over")

            # Errors carry the gRPC code and the server's message.
            with pytest.raises(AstraeaError) as info:
                await client.get_job("nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert "unknown job" in info.value.message
            with pytest.raises(AstraeaError) as info:
                await client.run_segment("nope", prompt_token_ids=[1])
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(AstraeaError) as info:
                await client.start_job("loop")
            assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(AstraeaError) as info:
                async with client.tool_call("loop", "search"):
                    pass
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    asyncio.run(main())


def test_sync_client_runs_a_job() -> None:
    async def main() -> None:
        async with local_stack(workers=1, time_scale=TIME_SCALE) as st:
            def agent() -> tuple:
                with AgentClient(st.address) as client:
                    job = client.start_job("sync")
                    a = client.run_segment(job, prompt_token_ids=[1] * 10, max_tokens=8,
                                           next_tool_category="search")
                    with client.tool_call(job, "search"):
                        pass
                    b = client.run_segment(job, prompt_text="result", max_tokens=5)
                    status = client.end_job(job)
                    with pytest.raises(AstraeaError) as info:
                        client.get_job("missing")
                    return a, b, status, info.value.code
            a, b, status, code = await asyncio.to_thread(agent)
            assert (len(a.tokens), a.finish_reason) == (8, FinishReason.TOOL_CALL)
            assert (len(b.tokens), b.finish_reason) == (5, FinishReason.LENGTH)
            assert status.generated_tokens == 13
            assert code == grpc.StatusCode.NOT_FOUND
    asyncio.run(main())


def test_gap_in_token_indices_is_an_error() -> None:
    c = _Collector("j")
    c.feed(agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(first_index=0, token_ids=[1, 2])))
    with pytest.raises(AstraeaError, match="not contiguous: expected first_index 2, got 3"):
        c.feed(agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(first_index=3, token_ids=[4])))
    with pytest.raises(AstraeaError, match="without a done event"):
        _Collector("k").close()


def test_replay_stack_completes_every_job(tmp_path, capsys) -> None:
    trace = tmp_path / "mix.jsonl"
    write_native(generate_mix(12, seed=5), trace)  # no arrival times: --qps applies
    out = tmp_path / "replay.json"
    rc = cli.main(["replay", str(trace), "--stack", "--qps", "4", "--time-scale", "0.002",
                   "--workers", "2", "--policy-label", "astraea-live", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "astraea-live" in printed and "mean" in printed
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["policy"] == "astraea-live" and row["qps"] == 4.0
    assert row["jobs"] == 12 and row["jobs_completed"] == 12
    # Virtual seconds: nobody beats the idle-engine JCT (a slow stack only adds to it).
    assert row["mean_jct_s"] >= row["mean_idle_jct_s"] * (1 - 0.05)
    assert data["runs"][0]["errors"] == 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_completes_every_job_live_under_memory_pressure(tmp_path, policy) -> None:
    """The planner skips the plans the core proves empty (nothing waits, no policy revisits):
    no policy's job may be stranded by it, timers and control loops included (Continuum's
    TTLs, ThunderAgent's ticks, MARS's window), with a pool small enough to make them act."""
    trace, profile = tmp_path / "tiny.jsonl", tmp_path / "small-48.json"
    write_native(generate_tiny_agent(24, seed=2, qps=4.0), trace)
    profile.write_text(json.dumps(SMALL_48))
    out = tmp_path / "replay.json"
    assert cli.main(["replay", str(trace), "--stack", "--time-scale", "0.02", "--workers", "1",
                     "--policy", policy, "--profile", str(profile), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["jobs_completed"] == 24
    assert row["mean_jct_s"] >= row["mean_idle_jct_s"] * (1 - 0.05)


def test_replay_without_arrivals_needs_qps(tmp_path, capsys) -> None:
    trace = tmp_path / "mix.jsonl"
    write_native(generate_mix(3, seed=1), trace)
    assert cli.main(["replay", str(trace), "--stack"]) == 2
    assert "give --qps" in capsys.readouterr().err


def test_compare_live_prints_each_policy_side_by_side(tmp_path, capsys, monkeypatch) -> None:
    # Keep the live runs' job records, to work out their mean JCT here.
    live_records = []
    real_replay = replay_module.replay

    async def recording_replay(*args, **kwargs):
        result = await real_replay(*args, **kwargs)
        live_records.append(result.records)
        return result

    monkeypatch.setattr(replay_module, "replay", recording_replay)
    out_file = tmp_path / "cmp.json"
    rc = cli.main(["compare-live", "infercept", "--jobs", "10", "--qps", "4",
                   "--time-scale", "0.002", "--policy", "vllm-fcfs,astraea",
                   "--out", str(out_file)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {cols[0]: cols for cols in map(str.split, out.splitlines())
            if len(cols) > 1 and cols[0] in ("vllm-fcfs", "astraea") and cols[1].isdigit()}
    assert set(rows) == {"vllm-fcfs", "astraea"}
    saved = json.loads(out_file.read_text())["policies"]
    for policy, cols in rows.items():
        jobs, sim_mean, live_mean, ratio = int(cols[1]), *map(float, cols[2:5])
        assert jobs == 10 and sim_mean > 0 and live_mean > 0
        # The printed ratio is the exact one rounded (the means are printed rounded too).
        assert ratio == pytest.approx(saved[policy]["live_over_sim"], abs=5e-4)
        assert saved[policy]["live"]["jobs_completed"] == 10
    # Against means worked out here: the simulator's from its own run of the same jobs, the
    # live one from the replayed jobs' records, each as finish minus arrival.
    profile = load_profile("gptj-6b-a100")
    jobs = generate_mix(10, 0, qps=4.0, context_window=profile.context_window)
    sim_means, live_means = {}, {}
    for policy, records in zip(("vllm-fcfs", "astraea"), live_records, strict=True):
        sim = Simulation(list(jobs), profile, policy).run().records
        sim_means[policy] = fmean(r.finish_s - r.arrival_s for r in sim)
        live_means[policy] = fmean(r.finish_s - r.arrival_s for r in records)
        assert saved[policy]["simulator"]["mean_jct_s"] == pytest.approx(sim_means[policy])
        assert saved[policy]["live"]["mean_jct_s"] == pytest.approx(live_means[policy])
        assert float(rows[policy][2]) == pytest.approx(sim_means[policy], abs=0.005)
        assert float(rows[policy][3]) == pytest.approx(live_means[policy], abs=0.005)
        assert saved[policy]["live_over_sim"] == pytest.approx(
            live_means[policy] / sim_means[policy])
    assert (f"astraea / vllm-fcfs mean JCT: simulator "
            f"{sim_means['astraea'] / sim_means['vllm-fcfs']:.3f}, live "
            f"{live_means['astraea'] / live_means['vllm-fcfs']:.3f}") in out
    # KV decisions side by side: vllm-fcfs discards at every tool call, live as simulated.
    tool_calls = sum(1 for j in jobs for seg in j.segments if seg.tool is not None)
    assert tool_calls > 0
    for policy in ("vllm-fcfs", "astraea"):
        kv = saved[policy]["kv_decisions"]
        assert kv["simulator"] == dict(Simulation(list(jobs), profile, policy).run()
                                       .decision_counts)
        assert sum(kv["live"].get(k, 0) for k in ("preserve", "swap", "discard")) >= tool_calls
    assert saved["vllm-fcfs"]["kv_decisions"]["live"]["discard"] == tool_calls
    assert saved["vllm-fcfs"]["kv_decisions"]["simulator"]["discard"] == tool_calls
    line = next(x for x in out.splitlines() if x.split()[:1] == ["vllm-fcfs"]
                and "discard" in x)
    assert f"discard {tool_calls} / {tool_calls}" in line
