"""Every check of the client API, over real gRPC on loopback against an in-process control
plane with one simulated worker: each bad request gets its exact status code, a message that
names the offending field (and, past StartJob, the job), and changes nothing about the job."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from astraea.profile import load_profile
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"
WINDOW = load_profile(PROFILE).context_window  # 4,096 tokens
CFG = ServiceConfig()  # the limits under test are the shipped defaults
# Real time: a segment of a few tokens takes ~0.1 s, a 3,000-token one a minute, so a
# "running" job is still running when the bad call arrives.
TIME_SCALE = 1.0
CALL_TIMEOUT_S = 10.0  # a check that lets a bad request through must fail, not hang
JOB = "j"

IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
AE = grpc.StatusCode.ALREADY_EXISTS
FP = grpc.StatusCode.FAILED_PRECONDITION

PROMPT = common_pb2.TokenIds(ids=list(range(10)))
FIRST_SEGMENT_TOKENS = 4  # the api_wait job's context: 10 + 4 tokens


def tokens(n: int) -> common_pb2.TokenIds:
    return common_pb2.TokenIds(ids=[7] * n)


async def collect(call) -> list:
    return [ev async for ev in call]


@contextlib.asynccontextmanager
async def control_plane():
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE))
    address = f"127.0.0.1:{server.port}"
    worker = asyncio.create_task(run_worker(
        address, SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "w0"))
    channel = grpc.aio.insecure_channel(address)
    try:
        for _ in range(500):
            if server.control_plane.registry.workers:
                break
            await asyncio.sleep(0.01)
        assert server.control_plane.registry.workers, "the worker did not register"
        yield agent_pb2_grpc.AgentServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(worker, 5)


# --- the job's state before the bad call ------------------------------------------------------
async def _until_state(stub, state: int) -> None:
    for _ in range(500):
        if (await stub.GetJob(agent_pb2.GetJobRequest(job_id=JOB))).state == state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job never reached state {state}")


async def setup_job(stub, state: str) -> asyncio.Task | None:
    """Bring job JOB to `state`; returns a segment stream still being read, if any."""
    if state == "none":
        return None
    await stub.StartJob(agent_pb2.StartJobRequest(job_id=JOB, category="test"))
    if state == "arrived":
        return None
    if state == "finished":
        await stub.EndJob(agent_pb2.EndJobRequest(job_id=JOB))
        return None
    if state == "running":
        task = asyncio.create_task(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
            job_id=JOB, prompt_token_ids=PROMPT,
            sampling=common_pb2.SamplingParams(max_tokens=3000)))))
        await _until_state(stub, common_pb2.JOB_STATE_RUNNING)
        return task
    assert state == "api_wait", state
    events = await collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
        job_id=JOB, prompt_token_ids=PROMPT, next_tool_category="search",
        sampling=common_pb2.SamplingParams(max_tokens=FIRST_SEGMENT_TOKENS))))
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALL
    return None


# --- the table --------------------------------------------------------------------------------
Call = Callable[[agent_pb2_grpc.AgentServiceStub], Awaitable]


@dataclass(frozen=True)
class Case:
    name: str
    state: str  # of job JOB before the call: none, arrived, running, api_wait, finished
    call: Call
    code: grpc.StatusCode
    fragments: tuple[str, ...]  # each must appear in the status message


def run_segment(job_id: str = JOB, **fields) -> Call:
    return lambda stub: collect(stub.RunSegment(agent_pb2.RunSegmentRequest(job_id=job_id,
                                                                            **fields)))


def sampled(**sampling) -> Call:
    return run_segment(prompt_token_ids=PROMPT, sampling=common_pb2.SamplingParams(**sampling))


def tool_call(job_id: str = JOB, **fields) -> Call:
    return lambda stub: stub.ReportToolCall(agent_pb2.ReportToolCallRequest(job_id=job_id,
                                                                            **fields))


START = agent_pb2.TOOL_CALL_PHASE_START
END = agent_pb2.TOOL_CALL_PHASE_END
LONG_ID = "x" * (CFG.max_id_chars + 1)
RPCS_BY_JOB_ID: dict[str, Callable[[str], Call]] = {
    "RunSegment": lambda j: run_segment(j, prompt_token_ids=PROMPT),
    "ReportToolCall": lambda j: tool_call(j, phase=START),
    "EndJob": lambda j: lambda stub: stub.EndJob(agent_pb2.EndJobRequest(job_id=j)),
    "CancelJob": lambda j: lambda stub: stub.CancelJob(agent_pb2.CancelJobRequest(job_id=j)),
    "GetJob": lambda j: lambda stub: stub.GetJob(agent_pb2.GetJobRequest(job_id=j)),
}
# The api_wait job holds 14 tokens of context.
ROOM_AFTER_10 = WINDOW - 10  # room left for output by a fresh job's 10-token prompt

CASES = [
    # StartJob
    Case("start: job_id too long", "none",
         lambda stub: stub.StartJob(agent_pb2.StartJobRequest(job_id=LONG_ID)), IA,
         ("job_id", f"{CFG.max_id_chars + 1} characters", f"at most {CFG.max_id_chars}")),
    Case("start: category too long", "none",
         lambda stub: stub.StartJob(agent_pb2.StartJobRequest(job_id="k", category=LONG_ID)),
         IA, ("category", f"{CFG.max_id_chars + 1} characters")),
    Case("start: duplicate job id", "arrived",
         lambda stub: stub.StartJob(agent_pb2.StartJobRequest(job_id=JOB)), AE,
         ("job id 'j'", "already exists")),
    # every call naming a job: an empty id, an unknown one
    *[Case(f"{rpc}: empty job_id", "arrived", make(""), IA, ("job_id is empty",))
      for rpc, make in RPCS_BY_JOB_ID.items()],
    *[Case(f"{rpc}: unknown job", "arrived", make("nope"), NF, ("unknown job id 'nope'",))
      for rpc, make in RPCS_BY_JOB_ID.items()],
    # RunSegment: the job's state
    Case("run: finished job", "finished", run_segment(prompt_token_ids=PROMPT), FP,
         ("job 'j'", "finished")),
    Case("run: segment already running", "running", run_segment(prompt_token_ids=PROMPT), FP,
         ("job 'j'", "already running segment 0")),
    # RunSegment: the input
    Case("run: next_tool_category too long", "arrived",
         run_segment(prompt_token_ids=PROMPT, next_tool_category=LONG_ID), IA,
         ("job 'j'", "next_tool_category", f"{CFG.max_id_chars + 1} characters")),
    Case("run: no input", "arrived", run_segment(), IA,
         ("job 'j'", "prompt_text or prompt_token_ids")),
    Case("run: empty prompt_text", "arrived", run_segment(prompt_text=""), IA,
         ("job 'j'", "prompt_text is empty")),
    Case("run: prompt_text too long", "arrived",
         run_segment(prompt_text="a" * (CFG.max_prompt_chars + 1)), IA,
         ("job 'j'", "prompt_text", f"{CFG.max_prompt_chars + 1} characters",
          f"at most {CFG.max_prompt_chars}")),
    Case("run: empty prompt_token_ids", "arrived", run_segment(prompt_token_ids=tokens(0)), IA,
         ("job 'j'", "prompt_token_ids is empty")),
    Case("run: a prompt filling the context window", "arrived",
         run_segment(prompt_token_ids=tokens(WINDOW)), IA,
         ("job 'j'", "prompt too long", f"{WINDOW} new", f"{WINDOW}-token context window")),
    Case("run: a tool result filling what the context leaves", "api_wait",
         run_segment(prompt_token_ids=tokens(WINDOW - 10 - FIRST_SEGMENT_TOKENS)), IA,
         ("job 'j'", "prompt too long", f"{10 + FIRST_SEGMENT_TOKENS} context tokens")),
    # RunSegment: sampling
    *[Case(f"run: temperature {t}", "arrived", sampled(temperature=t), IA,
           ("job 'j'", f"sampling.temperature is {t}", f"[0, {CFG.max_temperature}]"))
      for t in (-0.5, CFG.max_temperature + 0.5, math.inf, math.nan)],
    *[Case(f"run: top_p {p}", "arrived", sampled(top_p=p), IA,
           ("job 'j'", f"sampling.top_p is {p}", "(0, 1]"))
      for p in (0.0, -0.5, 1.5, math.nan)],
    Case("run: too many stop strings", "arrived",
         sampled(stop=["s"] * (CFG.max_stop_strings + 1)), IA,
         ("job 'j'", f"sampling.stop has {CFG.max_stop_strings + 1} strings",
          f"at most {CFG.max_stop_strings}")),
    Case("run: an empty stop string", "arrived", sampled(stop=["ok", ""]), IA,
         ("job 'j'", "sampling.stop[1]", f"1 to {CFG.max_stop_chars} characters")),
    Case("run: a stop string too long", "arrived",
         sampled(stop=["s" * (CFG.max_stop_chars + 1)]), IA,
         ("job 'j'", "sampling.stop[0]", f"1 to {CFG.max_stop_chars} characters")),
    *[Case(f"run: json_schema {text[:12]!r}", "arrived", sampled(json_schema=text), IA,
           ("job 'j'", "sampling.json_schema", why))
      for text, why in (("{not json", "is not JSON"), ('["a list"]', "must be a JSON object"),
                        ("true", "must be a JSON object"),
                        ('{"x": "' + "a" * CFG.max_json_schema_chars + '"}',
                         f"at most {CFG.max_json_schema_chars}"))],
    Case("run: max_tokens 0", "arrived", sampled(max_tokens=0), IA,
         ("job 'j'", "sampling.max_tokens is 0", "at least 1")),
    Case("run: max_tokens one past the window", "arrived", sampled(max_tokens=ROOM_AFTER_10 + 1),
         IA, ("job 'j'", f"sampling.max_tokens is {ROOM_AFTER_10 + 1}",
              f"at most {ROOM_AFTER_10}")),
    # ReportToolCall
    Case("tool: category too long", "api_wait", tool_call(phase=START, category=LONG_ID), IA,
         ("category", f"{CFG.max_id_chars + 1} characters")),
    Case("tool: phase unspecified", "api_wait", tool_call(), IA,
         ("phase is TOOL_CALL_PHASE_UNSPECIFIED",)),
    Case("tool: unknown phase", "api_wait", tool_call(phase=7), IA,
         ("unknown tool call phase 7",)),
    Case("tool: no tool call to report", "arrived", tool_call(phase=START), FP,
         ("job 'j' is arrived", "a tool call follows")),
    Case("tool: a tool call on a running job", "running", tool_call(phase=START), FP,
         ("job 'j' is running", "a tool call follows")),
    Case("tool: END without START", "api_wait", tool_call(phase=END), FP,
         ("job 'j'", "END without START")),
    # EndJob
    Case("end: a segment is running", "running",
         lambda stub: stub.EndJob(agent_pb2.EndJobRequest(job_id=JOB)), FP,
         ("job 'j'", "running a segment")),
]


def _snapshot(status: agent_pb2.JobStatus) -> tuple:
    """What a bad call must not change (a running segment's token count moves on its own)."""
    generated = None if status.state == common_pb2.JOB_STATE_RUNNING else status.generated_tokens
    return (status.state, status.segment_index, status.context_tokens, status.pending_tokens,
            generated, status.HasField("finished_unix_s"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_request_gets_its_status_and_a_message_naming_the_field(case: Case) -> None:
    async def main() -> None:
        async with control_plane() as stub:
            segment = await setup_job(stub, case.state)
            before = None
            if case.state != "none":
                before = _snapshot(await stub.GetJob(agent_pb2.GetJobRequest(job_id=JOB)))
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(case.call(stub), CALL_TIMEOUT_S)
                assert info.value.code() == case.code, info.value.details()
                for fragment in case.fragments:
                    assert fragment in info.value.details(), info.value.details()
                if before is not None:  # the bad call changed nothing
                    after = await stub.GetJob(agent_pb2.GetJobRequest(job_id=JOB))
                    assert _snapshot(after) == before
            finally:
                if segment is not None:
                    segment.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await segment

    asyncio.run(main())


def test_the_limits_themselves_are_accepted() -> None:
    """One inside every boundary the table steps over: a prompt one token short of the
    window with max_tokens 1, and sampling at the edges of its ranges."""
    async def main() -> None:
        async with control_plane() as stub:
            await stub.StartJob(agent_pb2.StartJobRequest(job_id=JOB, category="c" * 256))
            sampling = common_pb2.SamplingParams(
                max_tokens=1, temperature=CFG.max_temperature, top_p=1.0,
                stop=["s" * CFG.max_stop_chars] * CFG.max_stop_strings)
            events = await asyncio.wait_for(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id=JOB, prompt_token_ids=tokens(WINDOW - 1), sampling=sampling))),
                CALL_TIMEOUT_S)
            assert events[-1].done.timings.decode_tokens == 1
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="k" * CFG.max_id_chars))
            events = await asyncio.wait_for(collect(stub.RunSegment(agent_pb2.RunSegmentRequest(
                job_id="k" * CFG.max_id_chars, prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0,
                                                   top_p=1e-6)))), CALL_TIMEOUT_S)
            assert events[-1].done.timings.decode_tokens == 2

    asyncio.run(main())
