"""A real control-plane process with --state-dir is SIGKILLed in the middle of a replay of
agent jobs (segments, tool calls, simulated workers at a small time scale) and started again on
the same port with the same state: every accepted job completes, none is lost, and every
client receives, per segment, exactly the tokens it asked for (the simulated engine's
placeholders, in order: none twice, none missing), though some streams were cut mid-segment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from astraea.client import AsyncAgentClient, FinishReason, RetryPolicy
from astraea.profile import load_profile
from worker.process import WorkerProcess
from worker.sim.backend import SimulatedBackend, placeholder_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = "gptj-6b-a100"
TIME_SCALE = 0.1  # slow enough that the engine does not run far ahead of the clients
JOBS = 12
SEGMENTS = 3
WAIT_S = 90.0  # generous: the machine may be busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, state_dir: str, log_path: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE")}
    with open(log_path, "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "control_plane.service.server", "--listen",
             f"127.0.0.1:{port}", "--time-scale", str(TIME_SCALE), "--state-dir", state_dir,
             "--grace", "0.5"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def _wait_serving(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, "the control plane exited"
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, "the control plane did not become SERVING"
            await asyncio.sleep(0.05)


def _running_with_tokens(state_dir: str) -> int:
    """Jobs whose stored state is mid-segment with output tokens stored (output stored for
    the segment the job is at: one that ended moved the job to the next)."""
    with contextlib.closing(sqlite3.connect(f"file:{state_dir}/astraea.db?mode=ro",
                                            uri=True, timeout=5)) as db:
        return db.execute(
            "SELECT COUNT(DISTINCT j.job_id) FROM astraea_jobs j JOIN astraea_transcript t "
            "ON t.job_id = j.job_id AND t.segment = j.segment_index AND t.role = 'output' "
            "WHERE j.state <> 'finished' AND j.finished_unix_s IS NULL").fetchone()[0]


def _budget(job: int, segment: int) -> int:
    return 100 + 97 * ((job + segment) % 4)  # 100..391 tokens: some segments are long


async def _agent(client: AsyncAgentClient, job: int, progress: list[int],
                 streaming: set[int]) -> list[list[int]]:
    """One agent: SEGMENTS segments with a tool call between two (the last one, without,
    ends the job), then EndJob. Returns each segment's tokens."""
    job_id = f"job-{job}"
    await client.start_job(job_id, category="qa")
    tokens = []
    for s in range(SEGMENTS):
        last = s == SEGMENTS - 1
        stream = client.stream_segment(job_id, prompt_token_ids=[s + 1] * 12,
                                       max_tokens=_budget(job, s),
                                       next_tool_category=None if last else "search")
        async for chunk in stream:
            progress[0] += len(chunk.token_ids)
            streaming.add(job)  # mid-segment, with tokens received
        streaming.discard(job)
        result = stream.result
        assert result.finish_reason is (FinishReason.LENGTH if last else FinishReason.TOOL_CALL)
        tokens.append(result.tokens)
        if not last:
            async with client.tool_call(job_id, "search"):
                await asyncio.sleep(0.05)
    status = await client.end_job(job_id)  # ended by its last segment already: idempotent
    assert status.finished_unix_s > 0
    return tokens


def test_a_sigkilled_control_plane_restarted_on_its_state_loses_no_job(tmp_path):
    asyncio.run(asyncio.wait_for(_replay_through_a_kill(tmp_path), 240))


async def _replay_through_a_kill(tmp_path) -> None:
    port, state, log = _free_port(), str(tmp_path / "state"), str(tmp_path / "cp.log")
    address = f"127.0.0.1:{port}"
    proc = _start(port, state, log)
    workers = [WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE),
                             f"w{i}", heartbeat_interval_s=0.2) for i in range(2)]
    worker_tasks: list[asyncio.Task] = []
    try:
        await _wait_serving(port, proc)
        worker_tasks = [asyncio.create_task(w.run(address)) for w in workers]
        progress, streaming = [0], set()
        client = AsyncAgentClient(address, timeout=WAIT_S)
        client.retry = RetryPolicy(total_s=WAIT_S, max_backoff_s=0.5)
        async with client:
            agents = [asyncio.create_task(_agent(client, j, progress, streaming))
                      for j in range(JOBS)]
            expected_total = sum(_budget(j, s) for j in range(JOBS) for s in range(SEGMENTS))
            # Kill once a good part of the work has streamed, with segments cut mid-stream:
            # the state itself (read beside the writer: WAL) shows tokens of running ones.
            while progress[0] < expected_total // 3 or len(streaming) < 3 \
                    or _running_with_tokens(state) < 2:
                assert not any(a.done() and a.exception() for a in agents)
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
            killed_at = progress[0]
            await asyncio.sleep(0.3)  # clients see UNAVAILABLE and back off
            proc = _start(port, state, log)
            results = await asyncio.wait_for(asyncio.gather(*agents), WAIT_S * 2)
        assert killed_at < expected_total  # the kill did land mid-replay
        for j, segments in enumerate(results):
            for s, tokens in enumerate(segments):
                assert tokens == [placeholder_token(f"job-{j}", i)
                                  for i in range(_budget(j, s))], (j, s)
        with open(log) as f:
            restored = [r for r in map(json.loads, filter(str.strip, f))
                        if r.get("event") == "job restored"]
        assert restored  # the second process did restore jobs
        # ... and some of them had been cut mid-segment, with tokens already streamed.
        assert any(r["stored_tokens"] > 0 for r in restored), [
            (r["job_id"], r["state"], r["segment"], r["stored_tokens"]) for r in restored]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for t in worker_tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
