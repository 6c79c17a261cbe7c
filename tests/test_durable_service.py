"""A control plane with durable state, in process over real gRPC on loopback, against SQLite and
a throwaway PostgreSQL: jobs accepted before a restart are all there after it (in their API
wait, waiting for their first segment, or mid-segment), a client whose segment stream broke
resumes it without a token twice or missing, and finished jobs still answer. The restart here
closes the store (its queued writes commit); tests/test_durable_restart.py SIGKILLs a real
process instead."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from astraea.client import AgentClient, AsyncAgentClient, FinishReason, RetryPolicy
from astraea.client.retry import Backoff, resume_request, took_effect
from astraea.plan import JobState, KvState
from astraea.profile import load_profile
from astraea.tools.stack import Stack, StackConfig
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import build_scheduler
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import WorkerProcess
from worker.sim.backend import SimulatedBackend, placeholder_token

sys.path.insert(0, str(Path(__file__).parent))
from postgres_server import PostgresServer, find_bin_dir  # noqa: E402

PROFILE = "gptj-6b-a100"
TIME_SCALE = 0.05  # a 2000-token segment takes long enough to be cut mid-stream
WAIT_S = 60.0  # generous: the machine may be busy
RETRY = RetryPolicy(total_s=WAIT_S, initial_backoff_s=0.05, max_backoff_s=0.5)



@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("pg_server").create_database(f"t_{uuid.uuid4().hex[:12]}")


async def _until(predicate, seconds: float = WAIT_S) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def _crash(running) -> None:
    """Stop serving with no Shutdown to the workers (their streams just end), then release
    the store the way a dead process does."""
    running.control_plane.durable.stopping = True
    await running.server.stop(None)
    for task in running.tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    running.control_plane.durable.store.close()


def _tokens(job_id: str, n: int, start: int = 0) -> list[int]:
    return [placeholder_token(job_id, i) for i in range(start, n)]


def _config() -> ServiceConfig:
    return ServiceConfig(time_scale=TIME_SCALE)


def test_jobs_survive_a_restart_and_a_cut_segment_resumes(state):
    asyncio.run(asyncio.wait_for(_survive(state), 180))


async def _survive(state: str) -> None:
    first = await serve("127.0.0.1:0", "astraea", PROFILE, _config(), state=state)
    address = f"127.0.0.1:{first.port}"
    wp = WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "w1",
                       heartbeat_interval_s=0.1)
    worker = asyncio.create_task(wp.run(address))
    second = third = None
    client = AsyncAgentClient(address, timeout=WAIT_S)
    client.retry = RETRY
    try:
        await _until(lambda: len(first.control_plane.registry.workers) == 1)
        # "waiting": its segment called a tool, whose START was reported.
        await client.start_job("waiting", category="qa")
        seg = await client.run_segment("waiting", prompt_token_ids=[1] * 8, max_tokens=5,
                                       next_tool_category="search")
        assert seg.finish_reason is FinishReason.TOOL_CALL
        await client.report_tool_start("waiting", "search")
        # "new": started, no segment yet. "cut": its long segment is cut mid-stream.
        assert await client.start_job(category="qa")  # the client picks an id (retry set)
        await client.start_job("new", category="qa")
        await client.start_job("cut", category="qa")
        received: list[int] = []
        seen_before_crash = asyncio.Event()

        async def stream_cut():
            stream = client.stream_segment("cut", prompt_token_ids=[2] * 16, max_tokens=2000)
            async for chunk in stream:
                received.extend(chunk.token_ids)
                if len(received) >= 20:
                    seen_before_crash.set()
            return stream.result

        cut = asyncio.create_task(stream_cut())
        await asyncio.wait_for(seen_before_crash.wait(), WAIT_S)
        await _crash(first)
        assert not cut.done()  # the client is retrying, not failed

        second = await serve(address, "astraea", PROFILE, _config(), state=state)
        jobs = second.control_plane.registry.jobs
        assert {"waiting", "new", "cut"} <= set(jobs)
        assert jobs["waiting"].job.state is JobState.API_WAIT
        assert jobs["waiting"].job.kv_state is KvState.DISCARDED

        result = await asyncio.wait_for(cut, WAIT_S)
        assert received == result.tokens == _tokens("cut", 2000)
        assert result.finish_reason is FinishReason.LENGTH
        # The tool call opened before the restart closes after it; the job runs on.
        assert await client.report_tool_end("waiting", "search") >= 0
        seg = await client.run_segment("waiting", prompt_token_ids=[3] * 4, max_tokens=7)
        assert seg.tokens == _tokens("waiting", 7) and seg.segment_index == 1
        status = await client.get_job("waiting")
        assert status.state == common_pb2.JOB_STATE_FINISHED
        assert status.generated_tokens == 12
        seg = await client.run_segment("new", prompt_text="hello", max_tokens=3)
        assert seg.tokens == _tokens("new", 3)
        await _crash(second)
        second = None

        # Finished jobs are answered after a restart too (within the retention window).
        third = await serve(address, "astraea", PROFILE, _config(), state=state)
        status = await client.get_job("cut")
        assert status.state == common_pb2.JOB_STATE_FINISHED
        assert status.generated_tokens == 2000
        assert third.control_plane.registry.unfinished == 1  # the id the client picked
    finally:
        await client.close()
        for running in (third, second):
            if running is not None:
                await running.stop(grace=0.5)
        if third is None and second is None:
            with contextlib.suppress(Exception):
                await _crash(first)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker


def test_a_segment_whose_done_was_lost_is_replayed_with_its_done(tmp_path):
    async def main():
        state = str(tmp_path / "state")
        first = await serve("127.0.0.1:0", "astraea", PROFILE, _config(), state=state)
        address = f"127.0.0.1:{first.port}"
        wp = WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "w",
                           heartbeat_interval_s=0.1)
        worker = asyncio.create_task(wp.run(address))
        second = None
        try:
            await _until(lambda: len(first.control_plane.registry.workers) == 1)
            async with AsyncAgentClient(address, timeout=WAIT_S) as client:
                await client.start_job("j")
                await client.run_segment("j", prompt_token_ids=[1] * 4, max_tokens=9,
                                         next_tool_category="t")
                await client.start_job("last")  # its one segment ends the job
                await client.run_segment("last", prompt_text="x", max_tokens=6)
            await _crash(first)
            second = await serve(address, "astraea", PROFILE, _config(), state=state)
            # The client got 4 of the 9 tokens, then its stream broke before the done.
            req = agent_pb2.RunSegmentRequest(
                job_id="j", prompt_token_ids=common_pb2.TokenIds(ids=[1] * 4),
                sampling=common_pb2.SamplingParams(max_tokens=9), next_tool_category="t",
                resume_from_index=4)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                events = [ev async for ev in stub.RunSegment(req)]
                assert [ev.WhichOneof("event") for ev in events] == ["tokens", "done"]
                assert events[0].tokens.first_index == 4
                assert list(events[0].tokens.token_ids) == _tokens("j", 9, 4)
                assert events[1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALL
                # The segment that ended its job, none of whose tokens arrived: all of them.
                last = agent_pb2.RunSegmentRequest(job_id="last", prompt_text="x",
                                                   sampling=common_pb2.SamplingParams(
                                                       max_tokens=6), resume_from_index=0)
                events = [ev async for ev in stub.RunSegment(last)]
                assert list(events[0].tokens.token_ids) == _tokens("last", 6)
                assert events[1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
                # Beyond what was stored: refused, saying so.
                req.resume_from_index = 50
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.RunSegment(req):
                        pass
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            if second is not None:
                await second.stop(grace=0.5)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_control_plane_without_state_refuses_a_resume():
    async def main():
        running = await serve("127.0.0.1:0", "astraea", PROFILE, _config())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j"))
                req = agent_pb2.RunSegmentRequest(job_id="j", prompt_text="x",
                                                  resume_from_index=3)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.RunSegment(req):
                        pass
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "no durable state" in e.value.details()
        finally:
            await running.stop(grace=0.5)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_client_with_retry_waits_for_a_control_plane_that_comes_up(tmp_path):
    async def main():
        probe = await serve("127.0.0.1:0", "astraea", PROFILE, _config())
        address = f"127.0.0.1:{probe.port}"
        await probe.stop(grace=0)  # nobody listens there now
        async with AsyncAgentClient(address, timeout=5) as client:
            client.retry = RetryPolicy(total_s=0.3)
            with pytest.raises(Exception) as e:  # bounded: gives up with the last error
                await client.get_job("x")
            assert e.value.code is grpc.StatusCode.UNAVAILABLE
            client.retry = RETRY
            call = asyncio.create_task(client.start_job("late"))
            await asyncio.sleep(1.0)
            assert not call.done()
            running = await serve(address, "astraea", PROFILE, _config(),
                                  state=str(tmp_path / "s"))
            try:
                assert await asyncio.wait_for(call, WAIT_S) == "late"
            finally:
                await running.stop(grace=0.5)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_retry_refused_because_its_first_attempt_succeeded_counts_as_success():
    start = agent_pb2.StartJobRequest(job_id="j")
    assert took_effect("StartJob", start, grpc.StatusCode.ALREADY_EXISTS, "").job_id == "j"
    assert took_effect("StartJob", agent_pb2.StartJobRequest(),
                       grpc.StatusCode.ALREADY_EXISTS, "") is None
    tool = agent_pb2.ReportToolCallRequest(job_id="j", phase=agent_pb2.TOOL_CALL_PHASE_END)
    assert took_effect("ReportToolCall", tool, grpc.StatusCode.FAILED_PRECONDITION,
                       "job 'j': tool call END without START") is not None
    assert took_effect("ReportToolCall", tool, grpc.StatusCode.FAILED_PRECONDITION,
                       "job 'j' is running") is None
    assert took_effect("GetJob", agent_pb2.GetJobRequest(job_id="j"),
                       grpc.StatusCode.NOT_FOUND, "") is None
    # Only UNAVAILABLE is retried, and never without a policy.
    assert Backoff(None).next_delay(grpc.StatusCode.UNAVAILABLE) is None
    backoff = Backoff(RetryPolicy(total_s=10, initial_backoff_s=0.1, max_backoff_s=0.4))
    assert backoff.next_delay(grpc.StatusCode.INTERNAL) is None
    delays = [backoff.next_delay(grpc.StatusCode.UNAVAILABLE) for _ in range(5)]
    assert all(0 < d <= 0.4 for d in delays) and delays[-1] >= 0.2
    req = agent_pb2.RunSegmentRequest(job_id="j", prompt_text="x")
    assert not resume_request(req, 0, retry=False).HasField("resume_from_index")
    assert resume_request(req, 0, retry=True).HasField("resume_from_index")
    assert resume_request(req, 7, retry=True).resume_from_index == 7
    with pytest.raises(ValueError):
        RetryPolicy(total_s=-1)


def test_a_restored_job_has_its_kv_discarded_and_waits_as_it_did():
    sched = build_scheduler("astraea", load_profile(PROFILE), OnlineJobEstimator())
    waiting = sched.job_restored("a", -5.0, "qa", 2, 300, api_wait=True, now=1.0)
    assert (waiting.state, waiting.kv_state, waiting.api_start_s) == (
        JobState.API_WAIT, KvState.DISCARDED, 1.0)
    fresh = sched.job_restored("b", 0.0, "qa", 0, 0, api_wait=False, now=1.0)
    assert (fresh.state, fresh.kv_state) == (JobState.ARRIVED, KvState.NONE)
    # The next segment recomputes the whole context: it was lost with the old process.
    sched.segment_submitted("a", 2.0, 10)
    assert waiting.tokens_to_prefill == 310
    with pytest.raises(ValueError):
        sched.job_restored("a", 0.0, "qa", 0, 0, api_wait=False, now=1.0)


def test_a_stack_with_a_state_dir_keeps_its_jobs_when_the_control_plane_is_killed(tmp_path):
    """`astraea up`'s control plane (durable by default: state/ in the log dir) SIGKILLed and
    restarted by the stack's supervision: its job is still there, as it was."""
    logs = tmp_path / "logs"
    cfg = StackConfig(control_plane_listen="127.0.0.1:0", predictor=False, workers=1,
                      time_scale=0.01, log_dir=str(logs), state_dir="state",
                      restart_backoff_s=0.1)
    with Stack(cfg) as st:
        assert (logs / "state" / "astraea.db").exists()
        with AgentClient(st.control_plane_address, timeout=WAIT_S,
                         **st.client_options()) as client:
            client.retry = RETRY
            client.start_job("kept")
            client.run_segment("kept", prompt_text="look it up", max_tokens=3,
                               next_tool_category="search")
            os.kill(st.pids["control-plane"], signal.SIGKILL)
            deadline = time.monotonic() + WAIT_S
            while not any("control-plane restarted" in line for line in st.supervise()):
                assert time.monotonic() < deadline, "the control plane was not restarted"
                time.sleep(0.05)
            status = client.get_job("kept")  # retried until the new process answers
            assert status.state == common_pb2.JOB_STATE_API_WAIT
            assert status.segment_index == 1 and status.generated_tokens == 3
            seg = client.run_segment("kept", prompt_text="found it", max_tokens=4)
            assert seg.tokens == _tokens("kept", 4)


def test_a_cut_segment_nobody_resumes_ends_after_the_api_wait_timeout(tmp_path):
    async def main():
        state = str(tmp_path / "state")
        first = await serve("127.0.0.1:0", "astraea", PROFILE, _config(), state=state)
        address = f"127.0.0.1:{first.port}"
        wp = WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "w",
                           heartbeat_interval_s=0.1)
        worker = asyncio.create_task(wp.run(address))
        second = None
        try:
            await _until(lambda: len(first.control_plane.registry.workers) == 1)
            async with AsyncAgentClient(address, timeout=WAIT_S) as client:
                await client.start_job("gone")
                async for _ in client.stream_segment("gone", prompt_text="x", max_tokens=2000):
                    break  # one chunk, then the client is gone for good
                await _crash(first)
            second = await serve(address, "astraea", PROFILE,
                                 ServiceConfig(time_scale=TIME_SCALE, api_wait_timeout_s=0.5),
                                 state=state)
            entry = second.control_plane.registry.jobs["gone"]
            assert entry.finished_unix_s is None
            await _until(lambda: entry.finished_unix_s is not None)
            assert second.control_plane.registry.unfinished == 0
        finally:
            if second is not None:
                await second.stop(grace=0.5)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_restarted_postgres_holds_the_streams_and_refuses_new_jobs_meanwhile():
    """The database restarts under a running segment: StartJob gets UNAVAILABLE saying why
    (at once, not after a hang), the stream holds its tokens until they are committed again,
    and then goes on to the end with none missing; the store has them all."""
    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) installed")
    pg = PostgresServer.start()
    try:
        asyncio.run(asyncio.wait_for(_postgres_restart(pg, pg.create_database("cp")), 300))
    finally:
        pg.stop()


async def _postgres_restart(pg: PostgresServer, url: str) -> None:
    # Slower than the module's time scale: the segment must still be generating (so writing)
    # when the database goes away, however fast the machine (about 10 s for 2000 tokens).
    time_scale = 0.25
    running = await serve("127.0.0.1:0", "astraea", PROFILE,
                          ServiceConfig(time_scale=time_scale, store_reconnect_timeout_s=240),
                          state=url)
    address = f"127.0.0.1:{running.port}"
    store = running.control_plane.durable.store
    wp = WorkerProcess(SimulatedBackend(load_profile(PROFILE), time_scale=time_scale), "w1",
                       heartbeat_interval_s=0.1)
    paused = False
    worker = asyncio.create_task(wp.run(address))
    client = AsyncAgentClient(address, timeout=WAIT_S)
    channel = grpc.aio.insecure_channel(address)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        await _until(lambda: len(running.control_plane.registry.workers) == 1)
        await client.start_job("long", category="qa")
        received: list[int] = []
        enough = asyncio.Event()

        async def stream():
            s = client.stream_segment("long", prompt_token_ids=[2] * 16, max_tokens=2000)
            async for chunk in s:
                received.extend(chunk.token_ids)
                if len(received) >= 20:
                    enough.set()
            return s.result

        streaming = asyncio.create_task(stream())
        await asyncio.wait_for(enough.wait(), WAIT_S)
        await asyncio.to_thread(pg.pause)
        paused = True
        assert not streaming.done(), "the segment ended before the database went away"
        await _until(lambda: store.outage is not None)  # the event gate's commits notice

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="during"), timeout=WAIT_S)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "the database is unreachable" in refused.value.details()
        assert "reconnecting for up to 240 s" in refused.value.details()  # --database-reconnect
        assert time.monotonic() - started < 10  # answered, not held for the outage

        # Nothing is streamed that is not committed: the client's count stands still.
        await asyncio.sleep(0.5)
        held = len(received)
        await asyncio.sleep(1.0)
        assert len(received) == held and not streaming.done()

        await asyncio.to_thread(pg.resume)
        paused = False
        result = await asyncio.wait_for(streaming, WAIT_S)
        assert received == result.tokens == _tokens("long", 2000)
        assert store.outage is None
        out = [p for p in store.get_transcript("long") if p.role == "output"]
        assert list(out[0].token_ids) == _tokens("long", 2000)
        await client.start_job("after", category="qa")  # accepted again
        assert store.get_job("after") is not None
        assert store.get_job("during") is None or store.get_job("during").finished_unix_s
    finally:
        if paused:  # a failure mid-outage: bring the server back so it can be stopped
            await asyncio.to_thread(pg.resume)
        await channel.close()
        await client.close()
        await running.stop(grace=0.5)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker
