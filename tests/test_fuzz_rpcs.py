"""Fuzzing every public RPC of a live control plane (real gRPC on loopback, a simulated worker):
malformed bytes, and messages whose every field is drawn at random (huge and empty strings,
unicode, extreme and non-finite numbers, unknown enum values, long lists, out-of-order worker
messages). Each call must get a deliberate status with a message - never UNKNOWN, INTERNAL
or a dropped connection - the server must stay up, and a job run beside the fuzzing must
complete."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from astraea.profile import load_profile
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2, worker_pb2
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"
CALL_TIMEOUT_S = 10.0
# Deliberate answers. UNKNOWN, INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED mean a handler
# crashed, the server died or a call hung.
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
KNOWN_JOB = "fuzz-known"

INTS = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
        F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
        F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
        F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_FIXED64: (0, 2**64 - 1)}


def _scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in INTS:
        lo, hi = INTS[t]
        return st.one_of(st.integers(0, 64), st.integers(lo, hi), st.sampled_from((lo, hi)))
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32
                                   if t == F.TYPE_FLOAT else 64), st.floats(0, 100))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.just(KNOWN_JOB),
                         st.text(alphabet="xé€😀\x00", min_size=1000, max_size=5000))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=200)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 20)  # unknown values included: proto3 enums are open
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def message(draw, cls, depth: int = 0):
    msg = cls()
    oneofs_done = set()
    for field in cls.DESCRIPTOR.fields:
        if field.containing_oneof is not None:
            group = field.containing_oneof.name
            if group in oneofs_done or not draw(st.booleans()):
                continue
            oneofs_done.add(group)
        elif not draw(st.booleans()):
            continue
        is_msg = field.type == F.TYPE_MESSAGE
        if is_msg and depth >= 3:
            continue
        repeated = field.is_repeated
        if is_msg and field.message_type.GetOptions().map_entry:
            continue
        if repeated:
            if is_msg:
                items = draw(st.lists(message(field.message_type._concrete_class, depth + 1),
                                      max_size=4))
                getattr(msg, field.name).extend(items)
            else:
                getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=40)))
        elif is_msg:
            getattr(msg, field.name).CopyFrom(
                draw(message(field.message_type._concrete_class, depth + 1)))
        else:
            with contextlib.suppress(ValueError, TypeError):  # e.g. a float out of float32
                setattr(msg, field.name, draw(_scalar(field)))
    return msg


class LiveControlPlane:
    """A control plane and one simulated worker on an event loop of their own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(serve("127.0.0.1:0", "astraea", PROFILE,
                                      ServiceConfig(time_scale=0.02)), 30)
        self.address = f"127.0.0.1:{self.server.port}"
        backend = SimulatedBackend(load_profile(PROFILE), time_scale=0.02)
        self.worker = asyncio.run_coroutine_threadsafe(
            run_worker(self.address, backend, "w0"), self.loop)

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self._run(self.server.stop(grace=0.5), 30)
        with contextlib.suppress(Exception):
            self.worker.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live():
    cp = LiveControlPlane()
    with grpc.insecure_channel(cp.address) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        for _ in range(500):
            if cp.server.control_plane.registry.workers:
                break
            threading.Event().wait(0.01)
        stub.StartJob(agent_pb2.StartJobRequest(job_id=KNOWN_JOB, category="fuzz"),
                      timeout=CALL_TIMEOUT_S)
        yield cp, ch, stub
    cp.stop()


def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            for _ in result:
                pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _check(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code in DELIBERATE, f"{what}: {code} {details[:300]!r}"
    if code is not grpc.StatusCode.OK:
        assert details.strip(), f"{what}: {code} without a message"


UNARY = [("StartJob", agent_pb2.StartJobRequest), ("ReportToolCall",
          agent_pb2.ReportToolCallRequest), ("EndJob", agent_pb2.EndJobRequest),
         ("CancelJob", agent_pb2.CancelJobRequest), ("GetJob", agent_pb2.GetJobRequest)]
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method, cls", UNARY, ids=[m for m, _ in UNARY])
@FUZZ
@given(data=st.data())
def test_unary_rpcs_answer_every_input_deliberately(live, method, cls, data):
    _, ch, stub = live
    if data.draw(st.integers(0, 4)) == 0:  # bytes that may not parse at all
        raw = data.draw(st.binary(max_size=300))
        call = ch.unary_unary(f"/astraea.v1.AgentService/{method}",
                              request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        code, details = _status(lambda: call(raw, timeout=CALL_TIMEOUT_S))
    else:
        req = data.draw(message(cls))
        code, details = _status(lambda: getattr(stub, method)(req, timeout=CALL_TIMEOUT_S))
    _check(code, details, method)


@pytest.mark.timeout(600)
@FUZZ
@given(req=message(agent_pb2.RunSegmentRequest))
def test_run_segment_answers_every_input_deliberately(live, req):
    _, _, stub = live
    if req.HasField("sampling") and req.sampling.max_tokens > 64:
        req.sampling.max_tokens = 64  # a valid request may run: keep it short
    code, details = _status(lambda: stub.RunSegment(req, timeout=CALL_TIMEOUT_S))
    _check(code, details, "RunSegment")


@pytest.mark.timeout(600)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(message(worker_pb2.WorkerMessage), min_size=1, max_size=6))
def test_a_fuzzed_worker_stream_is_ended_deliberately(live, msgs):
    _, ch, _ = live
    connect = ch.stream_stream("/astraea.v1.WorkerService/Connect",
                               request_serializer=worker_pb2.WorkerMessage.SerializeToString,
                               response_deserializer=worker_pb2.ControlMessage.FromString)
    code, details = _status(lambda: connect(iter(msgs), timeout=CALL_TIMEOUT_S))
    # A stream the fuzzer closes may also end OK or be cut when its messages run out.
    assert code in DELIBERATE | {grpc.StatusCode.CANCELLED}, f"{code} {details[:300]!r}"


def test_after_the_fuzzing_the_server_serves_and_a_job_completes(live):
    cp, ch, stub = live
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=CALL_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    job = stub.StartJob(agent_pb2.StartJobRequest(category="after-fuzz"),
                        timeout=CALL_TIMEOUT_S).job_id
    req = agent_pb2.RunSegmentRequest(
        job_id=job, prompt_token_ids=common_pb2.TokenIds(ids=[5] * 30),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0))
    events = list(stub.RunSegment(req, timeout=60))
    generated = sum(len(ev.tokens.token_ids) for ev in events if ev.HasField("tokens"))
    assert generated == 8 and events[-1].HasField("done")
    status = stub.EndJob(agent_pb2.EndJobRequest(job_id=job), timeout=CALL_TIMEOUT_S).status
    assert status.state == common_pb2.JOB_STATE_FINISHED
    assert not math.isnan(status.finished_unix_s)
