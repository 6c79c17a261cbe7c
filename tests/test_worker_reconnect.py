"""A worker outlives its control plane, over real gRPC on loopback: when the control plane
dies (no Shutdown) and comes back on the same port, the worker drops what it held, registers
with the new one and runs its jobs; a message over the worker's size limit ends the stream,
not the worker; a bounded reconnect gives up with exit 1; a graceful stop still ends it (0)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from structlog.testing import capture_logs

from astraea import wire
from astraea.client import AsyncAgentClient
from astraea.client.retry import RetryPolicy
from astraea.profile import load_profile
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import WorkerProcess, _StreamLost
from worker.sim.backend import SimulatedBackend, placeholder_token

PROFILE = "gptj-6b-a100"
TIME_SCALE = 0.05  # slow enough that a long segment is still running when the plane dies
WAIT_S = 30.0  # generous: the machine may be busy


async def _until(predicate, seconds: float = WAIT_S) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def _crash(server) -> None:
    """Stop a control plane the way a SIGKILL does for its peers: no Shutdown message, the
    streams just end."""
    await server.server.stop(None)
    for task in server.tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _one_job(address: str, job_id: str, tokens: int) -> list[int]:
    # With the SDK's retries, as a client of a restarted control plane runs: the process's
    # gRPC connections to the address may still be backing off from the crash (they share
    # subchannels), and a first call then fails UNAVAILABLE at once.
    async with AsyncAgentClient(address, timeout=WAIT_S) as client:
        client.retry = RetryPolicy(total_s=WAIT_S, max_backoff_s=0.5)
        await client.start_job(job_id, category="qa")
        seg = await client.run_segment(job_id, prompt_token_ids=[1] * 16, max_tokens=tokens)
        return list(seg.tokens)


def _worker(**kw) -> WorkerProcess:
    backend = SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE)
    return WorkerProcess(backend, "w1", heartbeat_interval_s=0.1, **kw)


def test_a_worker_re_registers_with_a_restarted_control_plane_and_runs_new_jobs():
    asyncio.run(asyncio.wait_for(_restarted_control_plane(), 120))


async def _restarted_control_plane():
    config = ServiceConfig(time_scale=TIME_SCALE)
    first = await serve("127.0.0.1:0", "astraea", PROFILE, config)
    address = f"127.0.0.1:{first.port}"
    wp = _worker()
    task = asyncio.create_task(wp.run(address))
    second = None
    try:
        await _until(lambda: len(first.control_plane.registry.workers) == 1)
        # A long segment is running on the worker when its control plane dies.
        client = AsyncAgentClient(address, timeout=WAIT_S)
        await client.start_job("old", category="qa")
        stream = client.stream_segment("old", prompt_token_ids=[1] * 16, max_tokens=4000)
        async for _ in stream:
            break
        assert wp.backend.view().running_seqs == 1
        await _crash(first)
        with contextlib.suppress(Exception):
            async for _ in stream:
                pass
        await client.close()
        await asyncio.sleep(0.5)  # the worker is retrying: it must not have exited
        assert not task.done()

        second = await serve(address, "astraea", PROFILE, config)
        await _until(lambda: len(second.control_plane.registry.workers) == 1)
        # The control plane counts the worker before the worker has read its answer.
        await _until(lambda: wp.registrations == 2)
        # The old segment was dropped, not left running for a control plane that forgot it.
        view = wp.backend.view()
        assert view.running_seqs == 0
        assert view.free_blocks == wp.backend.describe().kv_capacity_blocks
        assert await _one_job(address, "new", 20) == [placeholder_token("new", k)
                                                      for k in range(20)]
    finally:
        if second is not None:
            await second.stop(grace=0.5)
        else:
            await _crash(first)
    # A graceful stop says Shutdown: the worker leaves for good, and cleanly.
    assert await asyncio.wait_for(task, WAIT_S) == 0


def test_a_message_over_the_size_limit_ends_the_stream_and_the_worker_reconnects():
    asyncio.run(asyncio.wait_for(_oversized_message(), 120))


async def _oversized_message():
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE))
    address = f"127.0.0.1:{server.port}"
    cp = server.control_plane
    wp = _worker(max_message_bytes=64 * 1024)
    task = asyncio.create_task(wp.run(address))
    try:
        with capture_logs() as logs:
            # An Abort whose reason alone is over the worker's limit: refused with a clear
            # reason; one over twice the limit: refused by gRPC before it is read.
            for registrations, size in ((2, 100_000), (3, 300_000)):
                await _until(lambda r=registrations: len(cp.registry.workers) == 1
                             and wp.registrations == r - 1)
                (worker_id,) = cp.registry.workers
                huge = wire.Abort("nobody", worker_id, "x" * size)
                assert cp.send(worker_id, [wire.plan_action_to_proto(huge)])
                await _until(lambda r=registrations: wp.registrations == r
                             and len(cp.registry.workers) == 1)
                assert not task.done()
                assert list(cp.registry.workers) != [worker_id]  # a new registration
        lost = [e for e in logs if e["event"] == "control plane lost, reconnecting"]
        assert len(lost) == 2
        assert "over the limit of 65536" in lost[0]["error"], lost[0]
        assert await _one_job(address, "after", 10) == [placeholder_token("after", k)
                                                        for k in range(10)]
    finally:
        await server.stop(grace=0.5)
    assert await asyncio.wait_for(task, WAIT_S) == 0


def test_a_control_message_that_does_not_parse_ends_the_stream_with_the_reason():
    lost = _worker()._parse(b"\xff\xff\xff")
    assert isinstance(lost, _StreamLost) and "does not parse" in str(lost)


def test_a_worker_dropped_as_silent_registers_again():
    async def main():
        server = await serve("127.0.0.1:0", "astraea", PROFILE,
                             ServiceConfig(time_scale=TIME_SCALE, worker_timeout_s=0.3))
        # Heartbeats far apart: the watchdog drops it (UNAVAILABLE, with the reason).
        wp = WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE),
                           "slow", heartbeat_interval_s=5.0)
        task = asyncio.create_task(wp.run(f"127.0.0.1:{server.port}"))
        try:
            await _until(lambda: wp.registrations >= 2)
            assert not task.done()
        finally:
            await server.stop(grace=0.5)
        return await asyncio.wait_for(task, WAIT_S)

    assert asyncio.run(asyncio.wait_for(main(), 120)) == 0


def test_a_write_on_a_stream_that_has_just_ended_is_a_lost_stream_not_a_crash():
    """gRPC raises InvalidStateError (not an RpcError) for a write after the stream ended;
    the worker reads the stream's status instead and reconnects."""
    class EndedCall:
        async def write(self, msg):
            raise asyncio.InvalidStateError("RPC already finished.")

        async def code(self):
            return grpc.StatusCode.UNAVAILABLE

        async def details(self):
            return "Socket closed"

    with pytest.raises(_StreamLost, match="UNAVAILABLE: Socket closed"):
        asyncio.run(_worker()._session(EndedCall))


def test_a_bounded_reconnect_gives_up_with_exit_1():
    async def main():
        server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig())
        address = f"127.0.0.1:{server.port}"
        await _crash(server)  # a port nobody listens on any more
        wp = _worker(reconnect_timeout_s=1.0)
        return await wp.run(address), wp.registrations

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (1, 0)


@pytest.mark.parametrize("kw", [{"reconnect_timeout_s": -1}, {"max_message_bytes": 10}])
def test_bad_reconnect_settings_are_refused(kw):
    with pytest.raises(ValueError):
        _worker(**kw)
