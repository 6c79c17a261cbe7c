"""The gRPC contracts: generated code is fresh, wire.py round-trips the core's plan and
memory view, bad input is refused clearly, and a real gRPC stream carries them on loopback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from astraea import wire
from astraea.plan import (
    Admit,
    Evict,
    JobState,
    KvAction,
    KvState,
    Pause,
    Preempt,
    WorkerInfo,
    WorkerView,
)
from astraea.v1 import common_pb2, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "astraea" / "v1"


# --- generated code is fresh ------------------------------------------------------------------


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "__init__.py" and p.suffix in (".py", ".pyi")}


def test_generated_code_is_fresh(tmp_path):
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        pytest.fail("grpcio-tools is missing: install the test extra, pip install -e '.[test]'")
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto/astraea/v1").glob("*.proto"))
    # The command of scripts/gen_proto.sh, with tmp_path as the output directory.
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    fresh = _generated_files(tmp_path / "astraea" / "v1")
    committed = _generated_files(GENERATED)
    hint = "astraea/v1/ is stale: run scripts/gen_proto.sh (with the test extra's grpcio-tools)"
    assert sorted(committed) == sorted(fresh), hint
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{hint}; differing: {', '.join(stale)}"


# --- round trips ------------------------------------------------------------------------------


def _through_bytes(msg):
    """Serialize and parse again, as the network would."""
    return type(msg).FromString(msg.SerializeToString())


def _assert_same_fields(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        assert getattr(a, f.name) == getattr(b, f.name), f.name


PLAN_ACTIONS = [
    Admit("job-a", 3, new_tokens=120, context_tokens=4096, swap_in=True, priority=2.5),
    Admit("job-b", 3, new_tokens=1, context_tokens=0),
    *(Pause("job-c", 3, action) for action in KvAction),
    Evict("job-d", 3, KvAction.SWAP),
    Evict("job-e", 3, KvAction.DISCARD),
    Preempt("job-f", 3, KvAction.SWAP),
    Preempt("job-g", 3, KvAction.DISCARD),
    wire.Abort("job-h", 3, reason="client disconnected"),
]


@pytest.mark.parametrize("action", PLAN_ACTIONS, ids=lambda a: f"{type(a).__name__}-{a.job_id}")
def test_plan_action_round_trip(action):
    msg = _through_bytes(wire.plan_action_to_proto(action))
    assert msg.WhichOneof("action") == type(action).__name__.lower()
    _assert_same_fields(wire.plan_action_from_proto(msg, worker_id=3), action)


def test_plan_round_trip_keeps_order():
    msg = _through_bytes(wire.plan_to_proto(PLAN_ACTIONS))
    back = wire.plan_from_proto(msg, worker_id=3)
    assert len(back) == len(PLAN_ACTIONS)
    for got, want in zip(back, PLAN_ACTIONS):
        _assert_same_fields(got, want)


def test_worker_view_round_trip():
    view = WorkerView(worker_id=5, total_blocks=20_000, free_blocks=1234, block_size=16,
                      host_free_blocks=70_000, running_seqs=37, max_seqs=256,
                      running_context_tokens=812_345, step_time_s=0.0375, step_index=987_654,
                      swapping_out_blocks=64)
    msg = _through_bytes(wire.worker_view_to_proto(view))
    back = wire.worker_view_from_proto(msg, worker_id=5)
    _assert_same_fields(back, view)
    assert back.utilization == view.utilization


def test_worker_view_drops_the_per_job_callbacks():
    view = WorkerView(1, 10, 5, 16, 0, 0, 8, 0, 0.01, 0,
                      blocks_of=lambda job: 1, preemptible=lambda job: True)
    back = wire.worker_view_from_proto(wire.worker_view_to_proto(view), worker_id=1)
    assert back.blocks_of is None and back.preemptible is None


@pytest.mark.parametrize("needs_history", [True, False])
def test_worker_info_round_trip(needs_history):
    info = WorkerInfo(model="tiny", backend="vllm", needs_history=needs_history,
                      kv_capacity_blocks=2048, block_size=16, host_swap_blocks=4096,
                      max_num_seqs=64, max_num_batched_tokens=512, profile_name="simple")
    msg = _through_bytes(wire.worker_info_to_proto(info, "host:0"))
    assert msg.worker_name == "host:0" and msg.needs_history is needs_history
    assert wire.worker_info_from_proto(msg) == info


def test_register_without_capacity_is_refused():
    with pytest.raises(ValueError, match="kv_capacity_blocks, block_size and max_num_seqs"):
        wire.worker_info_from_proto(worker_pb2.Register(block_size=16, max_num_seqs=8))


@pytest.mark.parametrize(("core", "to_pb", "from_pb"), [
    (KvAction, wire.kv_action_to_proto, wire.kv_action_from_proto),
    (KvState, wire.kv_state_to_proto, wire.kv_state_from_proto),
    (JobState, wire.job_state_to_proto, wire.job_state_from_proto),
])
def test_enum_round_trip(core, to_pb, from_pb):
    values = {to_pb(member) for member in core}
    assert 0 not in values and len(values) == len(core)
    for member in core:
        assert from_pb(to_pb(member)) is member


# --- bad input --------------------------------------------------------------------------------


def test_empty_plan_action_is_refused():
    with pytest.raises(ValueError, match="PlanAction has no action set"):
        wire.plan_action_from_proto(worker_pb2.PlanAction(), worker_id=0)


def test_unspecified_kv_action_is_refused():
    with pytest.raises(ValueError, match="KV_ACTION_UNSPECIFIED"):
        wire.kv_action_from_proto(common_pb2.KV_ACTION_UNSPECIFIED)
    msg = worker_pb2.PlanAction(pause=worker_pb2.Pause(job_id="j"))
    with pytest.raises(ValueError, match=r"PlanAction\.pause\.action is KV_ACTION_UNSPECIFIED"):
        wire.plan_action_from_proto(msg, worker_id=0)


@pytest.mark.parametrize(("msg", "problem"), [
    (worker_pb2.PlanAction(evict=worker_pb2.Evict(job_id="j", action=common_pb2.KV_ACTION_PRESERVE)),
     r"PlanAction\.evict\.action must be SWAP or DISCARD"),
    (worker_pb2.PlanAction(preempt=worker_pb2.Preempt(job_id="j")),
     r"PlanAction\.preempt\.action is KV_ACTION_UNSPECIFIED"),
    (worker_pb2.PlanAction(admit=worker_pb2.Admit(new_tokens=4)), r"PlanAction\.admit\.job_id is empty"),
    (worker_pb2.PlanAction(pause=worker_pb2.Pause(job_id="j", action=42)), "unknown KvAction value 42"),
])
def test_invalid_plan_actions_are_refused(msg, problem):
    with pytest.raises(ValueError, match=problem):
        wire.plan_action_from_proto(_through_bytes(msg), worker_id=0)


def test_memory_report_without_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size is 0"):
        wire.worker_view_from_proto(worker_pb2.MemoryReport(total_blocks=10), worker_id=0)


# --- a real stream on loopback ----------------------------------------------------------------

ECHOED = Admit("job-1", 7, new_tokens=42, context_tokens=1000, swap_in=False, priority=1.5)


class _Control(worker_pb2_grpc.WorkerServiceServicer):
    """Answers Register with Registered(worker_id=7), then a Plan admitting ECHOED."""

    def Connect(self, request_iterator, context):
        for msg in request_iterator:
            if msg.WhichOneof("msg") != "register":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "register first")
            yield worker_pb2.ControlMessage(registered=worker_pb2.Registered(worker_id=7))
            plan = wire.plan_to_proto([ECHOED])
            plan.actions[0].admit.sampling.max_tokens = msg.register.max_num_seqs
            yield worker_pb2.ControlMessage(plan=plan)


@pytest.fixture
def control_plane():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(_Control(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port, "could not bind a loopback port"
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(1.0)


def test_worker_stream_on_loopback(control_plane):
    register = worker_pb2.Register(worker_name="w0", model="toy", backend="sim",
                                   kv_capacity_blocks=1000, block_size=16, host_swap_blocks=4000,
                                   max_num_seqs=8, max_num_batched_tokens=512, profile_name="simple")
    with grpc.insecure_channel(control_plane) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        replies = list(stub.Connect(iter([worker_pb2.WorkerMessage(register=register)]),
                                    timeout=2.0, wait_for_ready=True))
    assert [r.WhichOneof("msg") for r in replies] == ["registered", "plan"]
    worker_id = replies[0].registered.worker_id
    assert worker_id == 7
    (action,) = wire.plan_from_proto(replies[1].plan, worker_id)
    _assert_same_fields(action, ECHOED)
    assert replies[1].plan.actions[0].admit.sampling.max_tokens == 8
