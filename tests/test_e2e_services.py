"""End to end over real gRPC on loopback: the control plane, two simulated workers, and
agent jobs driven through the AgentService stub."""

from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
import pytest

from astraea.profile import load_profile
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend, placeholder_token

TIME_SCALE = 0.002  # 500× real time: a 2 s segment takes 4 ms
PROFILE = "gptj-6b-a100"


@contextlib.asynccontextmanager
async def stack(n_workers: int = 2, kv_blocks: int | None = None):
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE))
    address = f"127.0.0.1:{server.port}"
    profile = load_profile(PROFILE)
    backends = [SimulatedBackend(profile, time_scale=TIME_SCALE, kv_blocks=kv_blocks)
                for _ in range(n_workers)]
    workers = [asyncio.create_task(run_worker(address, b, f"w{i}"))
               for i, b in enumerate(backends)]
    channel = grpc.aio.insecure_channel(address)
    try:
        cp = server.control_plane
        for _ in range(200):
            if len(cp.registry.workers) == n_workers:
                break
            await asyncio.sleep(0.01)
        assert len(cp.registry.workers) == n_workers
        # The backends too: their engines are the workers' own memory, in this process.
        yield agent_pb2_grpc.AgentServiceStub(channel), server, backends
    finally:
        await channel.close()
        await server.stop(grace=0.5)
        for t in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(t, 5)


async def run_job(stub, job_id: str, segments: list[int], rng: random.Random) -> dict:
    await stub.StartJob(agent_pb2.StartJobRequest(job_id=job_id, category="test"))
    dones = []
    for i, n in enumerate(segments):
        last = i == len(segments) - 1
        req = agent_pb2.RunSegmentRequest(
            job_id=job_id, prompt_token_ids=common_pb2.TokenIds(ids=list(range(rng.randint(20, 200)))),
            sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0.0),
            next_tool_category="" if last else "search")
        expected_index, tokens, done = 0, [], None
        async for ev in stub.RunSegment(req):
            assert done is None, "event after done"
            if ev.WhichOneof("event") == "tokens":
                assert ev.tokens.first_index == expected_index, "token indices not contiguous"
                expected_index += len(ev.tokens.token_ids)
                tokens.extend(ev.tokens.token_ids)
            else:
                done = ev.done
        assert done is not None
        assert tokens == [placeholder_token(job_id, k) for k in range(n)], "tokens wrong"
        assert done.segment_index == i
        assert done.timings.decode_tokens == n
        assert done.timings.duration_s > 0
        expected = (common_pb2.FINISH_REASON_LENGTH if last
                    else common_pb2.FINISH_REASON_TOOL_CALL)
        assert done.finish_reason == expected
        dones.append(done)
        if not last:
            await stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
                job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_START, category="search"))
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            r = await stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
                job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_END))
            assert r.observed_duration_s > 0
    end = await stub.EndJob(agent_pb2.EndJobRequest(job_id=job_id))
    return {"dones": dones, "status": end.status}


async def expect_status(coro, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(coro, 10)  # a bad request let through fails here, not hangs
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()


async def collect(call) -> list:
    return [ev async for ev in call]


def test_jobs_complete_over_grpc() -> None:
    async def main() -> None:
        async with stack(2) as (stub, server, _):
            rng = random.Random(7)
            specs = {f"job-{i}": [rng.randint(5, 60) for _ in range(rng.randint(2, 3))]
                     for i in range(24)}
            results = await asyncio.wait_for(asyncio.gather(
                *(run_job(stub, j, segs, random.Random(j)) for j, segs in specs.items())), 30)
            workers_used = set()
            for (job_id, segs), res in zip(specs.items(), results, strict=True):
                st = res["status"]
                assert st.state == common_pb2.JOB_STATE_FINISHED
                assert st.segment_index == len(segs)
                assert st.generated_tokens == sum(segs)
                assert st.HasField("finished_unix_s")
                assert st.finished_unix_s > st.arrival_unix_s  # the JCT
                workers_used.add(st.worker_id)
                got = await stub.GetJob(agent_pb2.GetJobRequest(job_id=job_id))
                assert got.state == common_pb2.JOB_STATE_FINISHED
            assert workers_used == {0, 1}, "both workers should have run jobs"
            cp = server.control_plane
            assert not cp.scheduler.jobs, "finished jobs are dropped from the core"
            assert cp.scheduler.decision_counts  # KV decisions were made at tool calls
    asyncio.run(main())


def test_jobs_complete_under_memory_pressure() -> None:
    """Small KV caches: the KV policy evicts and swaps, and jobs still complete intact."""
    async def main() -> None:
        async with stack(2, kv_blocks=120) as (stub, server, _):
            rng = random.Random(3)
            specs = {f"p-{i}": [rng.randint(20, 80) for _ in range(3)] for i in range(20)}
            results = await asyncio.wait_for(asyncio.gather(
                *(run_job(stub, j, segs, random.Random(j)) for j, segs in specs.items())), 30)
            for segs, res in zip(specs.values(), results, strict=True):
                assert res["status"].generated_tokens == sum(segs)
            counts = server.control_plane.scheduler.decision_counts
            assert set(counts) - {"preserve"}, f"no memory pressure: {dict(counts)}"
    asyncio.run(main())


def test_bad_input_gets_clear_statuses() -> None:
    async def main() -> None:
        async with stack(1) as (stub, _, _):
            NF, AE = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
            FP, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
            prompt = common_pb2.TokenIds(ids=[1, 2, 3])
            await expect_status(stub.GetJob(agent_pb2.GetJobRequest(job_id="nope")), NF, "unknown job")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="nope", prompt_token_ids=prompt))), NF, "unknown job")
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="a"))
            await expect_status(stub.StartJob(agent_pb2.StartJobRequest(job_id="a")), AE, "already exists")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a"))), IA, "exactly one of")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_text=""))), IA, "prompt_text is empty")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=common_pb2.TokenIds()))), IA, "empty")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=-1.0)))), IA, "temperature")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=0)))), IA, "max_tokens")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=10**9)))), IA, "max_tokens")
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=common_pb2.TokenIds(ids=[1] * 5000)))), IA, "too long")
            await expect_status(stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
                job_id="a", phase=agent_pb2.TOOL_CALL_PHASE_START)), FP, "tool call")
            # The job is unharmed by all of that: it runs, ends, and then refuses more work.
            events = await collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=8))))
            assert sum(len(e.tokens.token_ids) for e in events[:-1]) == 8
            await stub.EndJob(agent_pb2.EndJobRequest(job_id="a"))
            await expect_status(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="a", prompt_token_ids=prompt))), FP, "finished")
            # Other jobs are served after the bad calls.
            res = await run_job(stub, "b", [10, 12], random.Random(1))
            assert res["status"].generated_tokens == 22
    asyncio.run(main())


def test_client_disconnect_cancels_job() -> None:
    async def main() -> None:
        async with stack(1) as (stub, server, backends):
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="gone"))
            call = stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="gone", prompt_token_ids=common_pb2.TokenIds(ids=[1] * 100),
                sampling=common_pb2.SamplingParams(max_tokens=3000)))
            await call.read()  # the first tokens: it is running
            call.cancel()
            cp = server.control_plane
            for _ in range(200):
                if cp.registry.jobs["gone"].finished_unix_s is not None:
                    break
                await asyncio.sleep(0.01)
            st = await stub.GetJob(agent_pb2.GetJobRequest(job_id="gone"))
            assert st.state == common_pb2.JOB_STATE_FINISHED
            # Its worker freed it: it runs nothing.
            for _ in range(200):
                view = next(iter(cp.registry.workers.values())).view
                if view.running_seqs == 0:
                    break
                await asyncio.sleep(0.01)
            assert view.running_seqs == 0
            # The worker itself dropped the job (the control plane sent it an Abort): not
            # running, no KV kept for it, every block of its pool free again (the job's
            # blocks stay only as evictable prefix cache, which counts as free).
            engine = backends[0].engine
            for _ in range(200):
                if engine.view().free_blocks == engine.pool.total:
                    break
                await asyncio.sleep(0.01)
            assert "gone" not in engine.running and "gone" not in engine.held
            assert engine.pool.used == 0
            assert engine.view().free_blocks == engine.pool.total
    asyncio.run(main())


def test_worker_registering_twice_is_rejected() -> None:
    async def main() -> None:
        server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = worker_pb2_grpc.WorkerServiceStub(ch)
                reg = worker_pb2.WorkerMessage(register=worker_pb2.Register(
                    worker_name="x", kv_capacity_blocks=100, block_size=16, max_num_seqs=8))
                call = stub.Connect()
                await call.write(reg)
                first = await call.read()
                assert first.WhichOneof("msg") == "registered"
                await call.write(reg)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while (await call.read()) is not grpc.aio.EOF:
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "already registered" in info.value.details()
                # A stream that does not start with register is refused too.
                call = stub.Connect()
                await call.write(worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat()))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "first message must be register"
                assert not server.control_plane.registry.workers  # both were dropped
        finally:
            await server.stop(grace=0.5)
    asyncio.run(main())
