"""Worker liveness over real gRPC on loopback: a worker that goes silent (a hung process, a
lost host whose connection lingers) is dropped after the control plane's worker timeout and
its jobs run elsewhere; a live worker's heartbeats keep it registered while it has no work."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from astraea.profile import load_profile
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend, placeholder_token

TIME_SCALE = 0.002
PROFILE = "gptj-6b-a100"
TIMEOUT_S = 0.4


async def _until(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def _silent_worker(address: str):
    """Registers like a worker (the caller reads what it is sent) and never says anything
    after Register: not a token, not a memory report, not a heartbeat."""
    channel = grpc.aio.insecure_channel(address)
    call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(worker_pb2.WorkerMessage(register=worker_pb2.Register(
        worker_name="hung", backend="sim", kv_capacity_blocks=10_000, block_size=16,
        max_num_seqs=64, max_num_batched_tokens=384)))
    return channel, call


def test_a_silent_worker_is_dropped_with_a_reason_and_its_job_runs_elsewhere():
    asyncio.run(_test_a_silent_worker_is_dropped_with_a_reason_and_its_job_runs_elsewhere())


async def _control_plane(worker_timeout_s: float):
    server = await serve("127.0.0.1:0", "astraea", PROFILE,
                         ServiceConfig(time_scale=TIME_SCALE, worker_timeout_s=worker_timeout_s))
    return server, f"127.0.0.1:{server.port}"


async def _test_a_silent_worker_is_dropped_with_a_reason_and_its_job_runs_elsewhere():
    server, address = await _control_plane(TIMEOUT_S)
    cp = server.control_plane
    channel, call = await _silent_worker(address)
    agent_channel = grpc.aio.insecure_channel(address)
    stub = agent_pb2_grpc.AgentServiceStub(agent_channel)
    real = None
    try:
        first = await call.read()
        assert first.WhichOneof("msg") == "registered"
        await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
        seg = stub.RunSegment(agent_pb2.RunSegmentRequest(
            job_id="j", prompt_token_ids=common_pb2.TokenIds(ids=list(range(50))),
            sampling=common_pb2.SamplingParams(max_tokens=20, temperature=0.0)))
        # The only worker is the silent one: the job is admitted there, and then nothing.
        msg = await asyncio.wait_for(call.read(), 5)
        assert [a.WhichOneof("action") for a in msg.plan.actions] == ["admit"]
        assert msg.plan.actions[0].admit.job_id == "j"
        real = asyncio.create_task(run_worker(
            address, SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "live",
            heartbeat_interval_s=0.05))
        # Dropped after the timeout, the stream closed with a status that says why ...
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sent nothing for" in err.value.details()
        assert [e.name for e in cp.registry.workers.values()] == ["live"]
        # ... and the job, re-queued with its KV discarded, completes on the live worker,
        # every token once and in order.
        tokens, done = [], None
        async for ev in seg:
            if ev.WhichOneof("event") == "tokens":
                assert ev.tokens.first_index == len(tokens)
                tokens.extend(ev.tokens.token_ids)
            else:
                done = ev.done
        assert tokens == [placeholder_token("j", k) for k in range(20)]
        assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    finally:
        call.cancel()
        await channel.close()
        await agent_channel.close()
        await server.stop(grace=0.5)
        if real is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(real, 5)


def test_heartbeats_keep_an_idle_worker_registered():
    asyncio.run(_test_heartbeats_keep_an_idle_worker_registered())


async def _test_heartbeats_keep_an_idle_worker_registered():
    server, address = await _control_plane(TIMEOUT_S)
    cp = server.control_plane
    task = asyncio.create_task(run_worker(
        address, SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "idle",
        heartbeat_interval_s=0.05))
    try:
        await _until(lambda: len(cp.registry.workers) == 1)
        await asyncio.sleep(4 * TIMEOUT_S)  # idle: only heartbeats reach the control plane
        assert [e.name for e in cp.registry.workers.values()] == ["idle"]
        assert not task.done()
    finally:
        await server.stop(grace=0.5)
        assert await asyncio.wait_for(task, 5) == 0  # a clean shutdown, not a drop


def test_worker_timeout_zero_never_drops():
    asyncio.run(_test_worker_timeout_zero_never_drops())


async def _test_worker_timeout_zero_never_drops():
    server, address = await _control_plane(0)
    channel, call = await _silent_worker(address)
    try:
        assert (await call.read()).WhichOneof("msg") == "registered"
        await asyncio.sleep(0.5)
        assert len(server.control_plane.registry.workers) == 1
    finally:
        call.cancel()
        await channel.close()
        await server.stop(grace=0.5)
