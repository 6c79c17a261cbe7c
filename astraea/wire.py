"""Conversion between the core's plain dataclasses and the `astraea.v1` proto messages.

The core (`control_plane/core`) knows nothing of protobuf; the services call these functions at
their edges. Messages coming in from the network are untrusted: every `*_from_proto` raises
`ValueError` naming the message and field when a required oneof is unset, an enum is
`*_UNSPECIFIED` (or a value this version does not know), or a job id is empty.

`worker_id` is not on the wire inside plans and memory reports: the worker ↔ control-plane
stream belongs to one worker, so the caller passes the stream's worker id back in.
"""

from __future__ import annotations

from collections.abc import Iterable

from astraea.plan import (
    Abort,
    Admit,
    Evict,
    JobState,
    KvAction,
    KvState,
    Pause,
    Preempt,
    WireAction,
    WorkerInfo,
    WorkerView,
)
from astraea.v1 import common_pb2, worker_pb2

# --- enums ----------------------------------------------------------------------------------

_KV_ACTION_TO_PROTO = {
    KvAction.PRESERVE: common_pb2.KV_ACTION_PRESERVE,
    KvAction.SWAP: common_pb2.KV_ACTION_SWAP,
    KvAction.DISCARD: common_pb2.KV_ACTION_DISCARD,
}
_KV_ACTION_FROM_PROTO = {v: k for k, v in _KV_ACTION_TO_PROTO.items()}

_KV_STATE_TO_PROTO = {
    KvState.NONE: common_pb2.KV_STATE_NONE,
    KvState.RESIDENT: common_pb2.KV_STATE_RESIDENT,
    KvState.SWAPPED: common_pb2.KV_STATE_SWAPPED,
    KvState.DISCARDED: common_pb2.KV_STATE_DISCARDED,
}
_KV_STATE_FROM_PROTO = {v: k for k, v in _KV_STATE_TO_PROTO.items()}

_JOB_STATE_TO_PROTO = {
    JobState.ARRIVED: common_pb2.JOB_STATE_ARRIVED,
    JobState.READY: common_pb2.JOB_STATE_READY,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.API_WAIT: common_pb2.JOB_STATE_API_WAIT,
    JobState.FINISHED: common_pb2.JOB_STATE_FINISHED,
}
_JOB_STATE_FROM_PROTO = {v: k for k, v in _JOB_STATE_TO_PROTO.items()}


def _enum_from_proto(table: dict, enum_pb, value: int, where: str):
    try:
        return table[value]
    except KeyError:
        if value == 0:
            raise ValueError(f"{where} is {enum_pb.Name(0)}: a value must be set") from None
        raise ValueError(f"{where} has unknown {enum_pb.DESCRIPTOR.name} value {value}") from None


def kv_action_to_proto(action: KvAction) -> int:
    return _KV_ACTION_TO_PROTO[action]


def kv_action_from_proto(value: int, where: str = "KvAction") -> KvAction:
    return _enum_from_proto(_KV_ACTION_FROM_PROTO, common_pb2.KvAction, value, where)


def kv_state_to_proto(state: KvState) -> int:
    return _KV_STATE_TO_PROTO[state]


def kv_state_from_proto(value: int, where: str = "KvState") -> KvState:
    return _enum_from_proto(_KV_STATE_FROM_PROTO, common_pb2.KvState, value, where)


def job_state_to_proto(state: JobState) -> int:
    return _JOB_STATE_TO_PROTO[state]


def job_state_from_proto(value: int, where: str = "JobState") -> JobState:
    return _enum_from_proto(_JOB_STATE_FROM_PROTO, common_pb2.JobState, value, where)


# --- plan actions ---------------------------------------------------------------------------


def plan_action_to_proto(action: WireAction) -> worker_pb2.PlanAction:
    """One core plan action (or an `Abort`) as a `PlanAction`; `worker_id` is dropped.

    For an Admit only the core's fields are set; the control plane adds the segment's input
    (`sampling`, `max_tokens`, `prompt_text`/`prompt_token_ids`) on `msg.admit` itself.
    """
    msg = worker_pb2.PlanAction()
    if isinstance(action, Admit):
        msg.admit.job_id = action.job_id
        msg.admit.new_tokens = action.new_tokens
        msg.admit.context_tokens = action.context_tokens
        msg.admit.swap_in = action.swap_in
        msg.admit.priority = action.priority
    elif isinstance(action, Pause):
        msg.pause.job_id = action.job_id
        msg.pause.action = kv_action_to_proto(action.action)
    elif isinstance(action, Evict):
        msg.evict.job_id = action.job_id
        msg.evict.action = kv_action_to_proto(action.action)
    elif isinstance(action, Preempt):
        msg.preempt.job_id = action.job_id
        msg.preempt.action = kv_action_to_proto(action.action)
    elif isinstance(action, Abort):
        msg.abort.job_id = action.job_id
        msg.abort.reason = action.reason
    else:
        raise TypeError(f"not a plan action: {action!r}")
    return msg


def _job_id(msg, where: str) -> str:
    if not msg.job_id:
        raise ValueError(f"{where}.job_id is empty")
    return msg.job_id


def _freeing_action(value: int, where: str) -> KvAction:
    action = kv_action_from_proto(value, where)
    if action is KvAction.PRESERVE:
        raise ValueError(f"{where} must be SWAP or DISCARD, not PRESERVE")
    return action


def plan_action_from_proto(msg: worker_pb2.PlanAction, worker_id: int) -> WireAction:
    """A `PlanAction` received on `worker_id`'s stream as a core plan action (or `Abort`)."""
    kind = msg.WhichOneof("action")
    if kind is None:
        raise ValueError("PlanAction has no action set (expected one of "
                         "admit, pause, evict, preempt, abort)")
    where = f"PlanAction.{kind}"
    if kind == "admit":
        a = msg.admit
        return Admit(job_id=_job_id(a, where), worker_id=worker_id, new_tokens=a.new_tokens,
                     context_tokens=a.context_tokens, swap_in=a.swap_in, priority=a.priority)
    if kind == "pause":
        p = msg.pause
        return Pause(job_id=_job_id(p, where), worker_id=worker_id,
                     action=kv_action_from_proto(p.action, f"{where}.action"))
    if kind == "evict":
        e = msg.evict
        return Evict(job_id=_job_id(e, where), worker_id=worker_id,
                     action=_freeing_action(e.action, f"{where}.action"))
    if kind == "preempt":
        p = msg.preempt
        return Preempt(job_id=_job_id(p, where), worker_id=worker_id,
                       action=_freeing_action(p.action, f"{where}.action"))
    # kind == "abort": the oneof has no other members.
    return Abort(job_id=_job_id(msg.abort, where), worker_id=worker_id, reason=msg.abort.reason)


def plan_to_proto(actions: Iterable[WireAction]) -> worker_pb2.Plan:
    """A list of plan actions (all for one worker) as a `Plan`, in order."""
    return worker_pb2.Plan(actions=[plan_action_to_proto(a) for a in actions])


def plan_from_proto(msg: worker_pb2.Plan, worker_id: int) -> list[WireAction]:
    return [plan_action_from_proto(a, worker_id) for a in msg.actions]


# --- registration ---------------------------------------------------------------------------


def worker_info_to_proto(info: WorkerInfo, worker_name: str) -> worker_pb2.Register:
    """What a worker registers with, as the first message of its stream."""
    return worker_pb2.Register(
        worker_name=worker_name,
        model=info.model,
        backend=info.backend,
        needs_history=info.needs_history,
        kv_capacity_blocks=info.kv_capacity_blocks,
        block_size=info.block_size,
        host_swap_blocks=info.host_swap_blocks,
        max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=info.max_num_batched_tokens,
        profile_name=info.profile_name,
    )


def worker_info_from_proto(msg: worker_pb2.Register) -> WorkerInfo:
    """A `Register` as a `WorkerInfo` (the name stays behind: it is the stream's, for logs)."""
    if msg.kv_capacity_blocks == 0 or msg.block_size == 0 or msg.max_num_seqs == 0:
        raise ValueError("register needs kv_capacity_blocks, block_size and max_num_seqs > 0")
    return WorkerInfo(
        model=msg.model,
        backend=msg.backend,
        needs_history=msg.needs_history,
        kv_capacity_blocks=msg.kv_capacity_blocks,
        block_size=msg.block_size,
        host_swap_blocks=msg.host_swap_blocks,
        max_num_seqs=msg.max_num_seqs,
        max_num_batched_tokens=msg.max_num_batched_tokens,
        profile_name=msg.profile_name,
    )


# --- memory ---------------------------------------------------------------------------------


def worker_view_to_proto(view: WorkerView) -> worker_pb2.MemoryReport:
    """A `WorkerView` as a `MemoryReport`; `worker_id` and the per-job callbacks
    (`blocks_of`, `preemptible`) stay behind."""
    return worker_pb2.MemoryReport(
        total_blocks=view.total_blocks,
        free_blocks=view.free_blocks,
        block_size=view.block_size,
        host_free_blocks=view.host_free_blocks,
        running_seqs=view.running_seqs,
        max_seqs=view.max_seqs,
        running_context_tokens=view.running_context_tokens,
        step_time_s=view.step_time_s,
        step_index=view.step_index,
        swapping_out_blocks=view.swapping_out_blocks,
    )


def worker_view_from_proto(msg: worker_pb2.MemoryReport, worker_id: int) -> WorkerView:
    """A `MemoryReport` from `worker_id`'s stream as a `WorkerView` (no per-job callbacks:
    the scheduler then sizes jobs from their context, `WorkerView.blocks_for`)."""
    if msg.block_size == 0:
        raise ValueError("MemoryReport.block_size is 0")
    return WorkerView(
        worker_id=worker_id,
        total_blocks=msg.total_blocks,
        free_blocks=msg.free_blocks,
        block_size=msg.block_size,
        host_free_blocks=msg.host_free_blocks,
        running_seqs=msg.running_seqs,
        max_seqs=msg.max_seqs,
        running_context_tokens=msg.running_context_tokens,
        step_time_s=msg.step_time_s,
        step_index=msg.step_index,
        swapping_out_blocks=msg.swapping_out_blocks,
    )
