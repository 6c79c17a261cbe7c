"""The control plane's limits over real gRPC on loopback (in-process control plane, simulated
workers): every input bounded and checked, overload answered with RESOURCE_EXHAUSTED (never a
silent CANCELLED), and memory that stays flat (finished jobs forgotten, abandoned API waits
ended with their KV freed)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import grpc
import pytest

from astraea.profile import load_profile
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from control_plane.service import limits
from control_plane.service.context import ServiceConfig
from control_plane.service.server import build_parser, serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"
TIME_SCALE = 0.002  # engine seconds run 500x faster than real time
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
IA = grpc.StatusCode.INVALID_ARGUMENT
FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
PROMPT = common_pb2.TokenIds(ids=list(range(20)))


async def until(predicate, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


@contextlib.asynccontextmanager
async def stack(workers: int = 1, **config):
    """A control plane with `config` (ServiceConfig fields) and `workers` simulated workers;
    yields (running control plane, agent stub, address)."""
    server = await serve("127.0.0.1:0", "astraea", PROFILE,
                         ServiceConfig(time_scale=TIME_SCALE, **config))
    address = f"127.0.0.1:{server.port}"
    tasks = [asyncio.create_task(run_worker(
        address, SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), f"w{i}",
        heartbeat_interval_s=0.05)) for i in range(workers)]
    channel = grpc.aio.insecure_channel(address)
    try:
        await until(lambda: len(server.control_plane.registry.workers) == workers)
        yield server, agent_pb2_grpc.AgentServiceStub(channel), address
    finally:
        await channel.close()
        await server.stop(grace=0.5)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(t, 5)


async def segment(stub, job_id: str, tool: str = "", **fields) -> list:
    fields.setdefault("prompt_token_ids", PROMPT)
    req = agent_pb2.RunSegmentRequest(job_id=job_id, next_tool_category=tool,
                                      sampling=common_pb2.SamplingParams(max_tokens=4), **fields)
    return [ev async for ev in stub.RunSegment(req)]


async def status_of(coro) -> tuple[grpc.StatusCode, str, dict]:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details(), dict(e.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


def run(coro) -> None:
    asyncio.run(coro)


# --- bounded strings ------------------------------------------------------------------------------
def test_every_string_is_bounded_and_the_error_names_field_and_limit():
    async def body():
        cfg = ServiceConfig()
        async with stack() as (_, stub, _addr):
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="j"))
            long_id = "x" * (cfg.max_id_chars + 1)
            calls = {
                "GetJob.job_id": stub.GetJob(agent_pb2.GetJobRequest(job_id=long_id)),
                "EndJob.job_id": stub.EndJob(agent_pb2.EndJobRequest(job_id=long_id)),
                "ReportToolCall.category": stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
                    job_id="j", category=long_id, phase=agent_pb2.TOOL_CALL_PHASE_START)),
            }
            for name, call in calls.items():
                code, details, _ = await status_of(call)
                assert code == IA, name
                assert f"{cfg.max_id_chars + 1} characters" in details, name
                assert f"at most {cfg.max_id_chars}" in details, name
            # A CancelJob reason is what the worker, the client and the log receive: bounded.
            code, details, _ = await status_of(stub.CancelJob(agent_pb2.CancelJobRequest(
                job_id="j", reason="r" * ((4 << 20) - 64))))  # fits the server's 4 MiB
            assert code == IA and "reason has" in details
            assert f"at most {cfg.max_reason_chars}" in details
            assert (await stub.GetJob(agent_pb2.GetJobRequest(job_id="j"))).state == \
                common_pb2.JOB_STATE_ARRIVED  # the refused cancel changed nothing
    run(body())


def test_a_cancel_reason_reaches_the_client_bounded_and_the_workers_stay():
    async def body():
        async with stack(workers=2) as (server, stub, _addr):
            reason = "why" * 300  # within the limit
            for k in range(3):
                await stub.StartJob(agent_pb2.StartJobRequest(job_id=f"c{k}"))
                call = stub.RunSegment(agent_pb2.RunSegmentRequest(
                    job_id=f"c{k}", prompt_token_ids=PROMPT,
                    sampling=common_pb2.SamplingParams(max_tokens=3000)))
                await until(lambda k=k: server.control_plane.registry.jobs[f"c{k}"].job.state
                            .value == "running")
                await stub.CancelJob(agent_pb2.CancelJobRequest(job_id=f"c{k}", reason=reason))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.CANCELLED
                assert reason in err.value.details()
            assert len(server.control_plane.registry.workers) == 2  # no worker was lost
    run(body())


# --- unparseable requests ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["StartJob", "GetJob"])
def test_an_unparseable_request_is_invalid_argument_with_one_log_line(caplog, method):
    async def body():
        async with stack(workers=0) as (_, _stub, address):
            async with grpc.aio.insecure_channel(address) as channel:
                call = channel.unary_unary(f"/astraea.v1.AgentService/{method}")  # raw bytes
                with caplog.at_level(logging.WARNING):
                    code, details, _ = await status_of(call(b"\xff\xff\xff\xff", timeout=10))
        assert code == IA
        assert f"not a valid {method} request message" in details
        lines = [r for r in caplog.records if "unparseable" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback
    run(body())


def test_an_unparseable_worker_message_ends_its_stream_with_invalid_argument():
    async def body():
        async with stack(workers=0) as (server, _stub, address):
            async with grpc.aio.insecure_channel(address) as channel:
                call = channel.stream_stream("/astraea.v1.WorkerService/Connect",
                                             response_deserializer=worker_pb2.ControlMessage
                                             .FromString)()
                await call.write(_register().SerializeToString())
                assert (await call.read()).WhichOneof("msg") == "registered"
                await call.write(b"\xff\xff\xff\xff")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while True:
                        await asyncio.wait_for(call.read(), 10)
                assert err.value.code() == IA
                assert "not a valid Connect request message" in err.value.details()
            await until(lambda: not server.control_plane.registry.workers)
    run(body())


# --- memory reports checked against the registration ---------------------------------------------
def _register(blocks: int = 1) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(register=worker_pb2.Register(
        worker_name="impostor", backend="sim", kv_capacity_blocks=blocks, block_size=16,
        max_num_seqs=4, max_num_batched_tokens=384, host_swap_blocks=0))


BAD_REPORTS = {
    "free above total": (dict(total_blocks=1, free_blocks=4_294_967_295), "free_blocks"),
    "total above registered": (dict(total_blocks=2, free_blocks=2), "total_blocks"),
    "other block size": (dict(total_blocks=1, free_blocks=1, block_size=32), "block_size"),
    "more running than allowed": (dict(total_blocks=1, free_blocks=1, running_seqs=5),
                                  "running_seqs"),
    "host blocks not registered": (dict(total_blocks=1, free_blocks=1, host_free_blocks=9),
                                   "host_free_blocks"),
    "nan step time": (dict(total_blocks=1, free_blocks=1, step_time_s=float("nan")),
                      "step_time_s"),
}


@pytest.mark.parametrize("case", list(BAD_REPORTS))
def test_a_memory_report_that_contradicts_the_registration_ends_the_stream(case, caplog):
    fields, name = BAD_REPORTS[case]
    fields = {"block_size": 16, "max_seqs": 4, **fields}

    async def body():
        async with stack(workers=0) as (server, _stub, address):
            async with grpc.aio.insecure_channel(address) as channel:
                call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
                await call.write(_register())
                assert (await call.read()).WhichOneof("msg") == "registered"
                await call.write(worker_pb2.WorkerMessage(
                    memory=worker_pb2.MemoryReport(**fields)))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while True:
                        await asyncio.wait_for(call.read(), 10)
                assert err.value.code() == IA
                assert name in err.value.details() and "impostor" in err.value.details()
            # Dropped: it attracts no job.
            await until(lambda: not server.control_plane.registry.workers)
    run(body())


# --- overload ---------------------------------------------------------------------------------------
async def _start_many(stub, n: int, prefix: str) -> collections.Counter:
    results = await asyncio.gather(*(status_of(stub.StartJob(
        agent_pb2.StartJobRequest(job_id=f"{prefix}{i}"), timeout=120)) for i in range(n)))
    for code, details, trailing in results:
        if code == RE:
            assert "max_unfinished_jobs" in details
            assert trailing[limits.RETRY_AFTER_KEY] == str(ServiceConfig.retry_after_ms)
    return collections.Counter(code for code, _, _ in results)


def test_admission_refuses_beyond_the_limit_with_a_retry_hint_and_takes_jobs_again():
    async def body():
        async with stack(workers=0, max_unfinished_jobs=5) as (server, stub, _addr):
            assert await _start_many(stub, 20, "a") == {grpc.StatusCode.OK: 5, RE: 15}
            assert server.control_plane.registry.unfinished == 5
            admitted = next(iter(server.control_plane.registry.jobs))  # which won varies
            await stub.EndJob(agent_pb2.EndJobRequest(job_id=admitted))
            assert await _start_many(stub, 3, "b") == {grpc.StatusCode.OK: 1, RE: 2}
    run(body())


def test_per_client_bound():
    async def body():
        async with stack(workers=0, max_jobs_per_client=2) as (_, stub, _addr):
            codes = [(await status_of(stub.StartJob(agent_pb2.StartJobRequest(job_id=f"p{i}"))))[0]
                     for i in range(3)]
            assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, RE]
            _, details, trailing = await status_of(stub.StartJob(agent_pb2.StartJobRequest()))
            assert "max_jobs_per_client 2" in details and limits.RETRY_AFTER_KEY in trailing
    run(body())


def test_3000_concurrent_start_jobs_get_ok_or_resource_exhausted_never_cancelled():
    """gRPC's own pending-call bounds (1,000 soft / 3,000 hard) used to cancel about a quarter
    of such a burst silently; with them raised, admission alone decides."""
    async def body():
        async with stack(workers=0, max_unfinished_jobs=1000) as (_, stub, _addr):
            assert await _start_many(stub, 3000, "l") == {grpc.StatusCode.OK: 1000, RE: 2000}
    run(body())


def test_calls_beyond_the_concurrent_call_limit_are_resource_exhausted():
    """Open RunSegment streams hold their slot (no worker: they wait); one call more is
    refused by gRPC itself with RESOURCE_EXHAUSTED, and a slot freed is usable again."""
    async def body():
        async with stack(workers=0, max_concurrent_rpcs=3) as (server, stub, _addr):
            jobs = server.control_plane.registry.jobs
            calls = []
            for k in range(3):
                await stub.StartJob(agent_pb2.StartJobRequest(job_id=f"o{k}"), timeout=10)
                calls.append(stub.RunSegment(agent_pb2.RunSegmentRequest(
                    job_id=f"o{k}", prompt_token_ids=PROMPT)))
                await until(lambda k=k: jobs[f"o{k}"].segment is not None)
            code, details, _ = await status_of(stub.GetJob(agent_pb2.GetJobRequest(job_id="o0"),
                                                           timeout=10))
            assert code == RE, details
            calls[0].cancel()
            for _ in range(100):  # the slot is released once the server has seen the cancel
                code, _, _ = await status_of(stub.GetJob(agent_pb2.GetJobRequest(job_id="o1"),
                                                         timeout=10))
                if code == grpc.StatusCode.OK:
                    break
                await asyncio.sleep(0.05)
            assert code == grpc.StatusCode.OK
            for call in calls[1:]:
                call.cancel()
    run(body())


def test_limits_are_command_line_flags():
    args = build_parser().parse_args(["--max-unfinished-jobs", "7", "--api-wait-timeout", "60",
                                      "--finished-retention", "5"])
    cfg = ServiceConfig(**limits.from_args(args))
    assert (cfg.max_unfinished_jobs, cfg.api_wait_timeout_s, cfg.finished_retention_s) == \
        (7, 60.0, 5.0)
    with pytest.raises(ValueError, match="max_unfinished_jobs"):
        ServiceConfig(max_unfinished_jobs=0)


# --- memory stays flat ------------------------------------------------------------------------------
def test_finished_jobs_are_forgotten_after_the_retention_window():
    async def body():
        async with stack(workers=0, finished_retention_s=0.5, max_finished_jobs=50) as (
                server, stub, _addr):
            reg = server.control_plane.registry
            for i in range(300):
                await stub.StartJob(agent_pb2.StartJobRequest(job_id=f"f{i}"))
                status = (await stub.EndJob(agent_pb2.EndJobRequest(job_id=f"f{i}"))).status
                assert status.kv_state == common_pb2.KV_STATE_NONE  # its KV is gone
                assert len(reg.jobs) <= 50  # bounded while they keep coming
            assert (await stub.GetJob(agent_pb2.GetJobRequest(job_id="f299"))).state == \
                common_pb2.JOB_STATE_FINISHED
            await until(lambda: not reg.jobs)
            code, details, _ = await status_of(stub.GetJob(agent_pb2.GetJobRequest(
                job_id="f299")))
            assert code == NF and "forgotten" in details
            assert not server.control_plane.scheduler.jobs  # the core forgot them as well
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="f299"))  # the id is free
    run(body())


def test_an_abandoned_api_wait_is_ended_and_its_kv_freed():
    async def body():
        async with stack(api_wait_timeout_s=1.0) as (server, stub, _addr):
            cp = server.control_plane
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="w", category="test"))
            events = await segment(stub, "w", tool="search")
            assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALL
            status = await stub.GetJob(agent_pb2.GetJobRequest(job_id="w"))
            assert status.state == common_pb2.JOB_STATE_API_WAIT
            worker = next(iter(cp.registry.workers.values()))
            # The client goes away without a word: after the timeout the job is ended ...
            await until(lambda: cp.registry.jobs["w"].finished_unix_s is not None, 15)
            status = await stub.GetJob(agent_pb2.GetJobRequest(job_id="w"))
            assert status.state == common_pb2.JOB_STATE_FINISHED
            assert status.kv_state == common_pb2.KV_STATE_NONE
            # ... and the worker's memory report shows every block free again.
            await until(lambda: worker.view.free_blocks == worker.view.total_blocks)
            assert not any(cp.scheduler.paused.values())
    run(body())


def test_a_client_that_keeps_calling_keeps_its_api_wait():
    async def body():
        async with stack(api_wait_timeout_s=1.0) as (server, stub, _addr):
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="k", category="test"))
            await segment(stub, "k", tool="search")
            for _ in range(8):  # 2 s in all, a call every 0.25 s
                await stub.GetJob(agent_pb2.GetJobRequest(job_id="k"))
                await asyncio.sleep(0.25)
            assert server.control_plane.registry.jobs["k"].finished_unix_s is None
    run(body())


# --- tool calls -----------------------------------------------------------------------------------
def test_a_second_tool_call_start_while_one_is_open_is_refused():
    async def body():
        async with stack() as (_, stub, _addr):
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="t", category="test"))
            await segment(stub, "t", tool="search")

            def report(phase, category="search"):
                return stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
                    job_id="t", category=category, phase=phase))
            start, end = agent_pb2.TOOL_CALL_PHASE_START, agent_pb2.TOOL_CALL_PHASE_END
            await report(start)
            code, details, _ = await status_of(report(start, "browse"))
            assert code == FP and "already open" in details
            await asyncio.sleep(0.05)
            # The first call's start time was kept: END measures from it.
            assert (await report(end)).observed_duration_s > 0.05 / TIME_SCALE * 0.9
            await report(start)  # after END, a new call may start
    run(body())


# --- messages to workers stay within what they accept ---------------------------------------------
def test_plans_are_cut_to_the_worker_limit_and_an_oversized_admit_fails_only_its_job():
    async def body():
        limit = 16 << 10
        async with stack(worker_max_receive_bytes=limit) as (server, stub, _addr):
            cp = server.control_plane
            # Ten prompts of ~4.5 KB (1,500 three-byte ids): together far above the limit.
            for k in range(10):
                await stub.StartJob(agent_pb2.StartJobRequest(job_id=f"s{k}"))
            results = await asyncio.gather(*(segment(
                stub, f"s{k}", prompt_token_ids=common_pb2.TokenIds(ids=[100_000 + k] * 1500))
                for k in range(10)))
            assert all(ev[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
                       for ev in results)
            # One prompt alone above the limit (4,000 five-byte ids): its job fails, the
            # worker stays.
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="big"))
            code, details, _ = await status_of(segment(
                stub, "big", prompt_token_ids=common_pb2.TokenIds(ids=[1 << 28] * 4000)))
            assert code == RE and "more than a worker accepts" in details
            assert len(cp.registry.workers) == 1
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="after"))
            assert (await segment(stub, "after"))[-1].done.finish_reason == \
                common_pb2.FINISH_REASON_LENGTH
    run(body())
