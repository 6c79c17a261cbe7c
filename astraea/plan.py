"""The contract between the scheduler and a worker: memory views in, plan actions out.

Like vLLM's `SchedulerOutput`, a plan is plain data a worker can execute without knowing the
policy: admit (or resume) a segment, pause a job with a KV action after its segment ended,
evict the KV of a job that waits for an API, preempt a running segment, abort a job. These
types are shared by the scheduling core, the services and the simulator; the proto messages
of the same names (`astraea/v1/*.proto`) carry them between processes (`astraea.wire`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class JobState(enum.Enum):
    ARRIVED = "arrived"
    READY = "ready"
    RUNNING = "running"
    API_WAIT = "api_wait"
    FINISHED = "finished"


class KvAction(enum.Enum):
    """What happens to a job's KV cache while it waits for an API."""

    PRESERVE = "preserve"  # blocks stay on the GPU
    SWAP = "swap"  # blocks copied to host memory and freed on the GPU
    DISCARD = "discard"  # blocks freed; the context is recomputed on resume


class KvState(enum.Enum):
    """Where a job's KV cache is right now."""

    NONE = "none"  # nothing computed yet (a new job)
    RESIDENT = "resident"  # on the GPU of `Job.worker_id` (running, or preserved)
    SWAPPED = "swapped"  # in host memory of `Job.worker_id`
    DISCARDED = "discarded"  # gone (a prefix cache may still hold part of it)


@dataclass(frozen=True)
class Admit:
    """Run the job's next segment on `worker_id`.

    `new_tokens` are appended and prefilled; `context_tokens` is the job's history, which the
    worker already holds (preserved), copies back (`swap_in`), or recomputes (after a discard,
    less whatever its prefix cache still has).
    """

    job_id: str
    worker_id: int
    new_tokens: int
    context_tokens: int
    swap_in: bool = False
    priority: float = 0.0  # the worker prefills lower values first (ties: admission order)


@dataclass(frozen=True)
class Pause:
    """The job's segment ended with a tool call: keep, swap out or drop its KV."""

    job_id: str
    worker_id: int
    action: KvAction


@dataclass(frozen=True)
class Evict:
    """Free the GPU blocks of a job that is not running (waiting for its API, or ready)."""

    job_id: str
    worker_id: int
    action: KvAction  # SWAP or DISCARD


@dataclass(frozen=True)
class Preempt:
    """Stop a running segment now; its KV is swapped out or dropped (recomputed later)."""

    job_id: str
    worker_id: int
    action: KvAction


PlanAction = Admit | Pause | Evict | Preempt


@dataclass(frozen=True)
class Abort:
    """Drop a job from a worker entirely (stop it if running, free its GPU and host blocks).

    Not part of the scheduling core's plans: the service layer issues it on CancelJob, a client
    that disconnects mid-segment, or a failed job.
    """

    job_id: str
    worker_id: int
    reason: str = ""


WireAction = PlanAction | Abort


@dataclass(frozen=True)
class KvDecision:
    """A KV action with the inputs that led to it, so a trace can explain it."""

    job_id: str
    action: KvAction
    reason: str
    inputs: dict = field(default_factory=dict)


# Why a KV decision was taken, as counted by the scheduler (`Scheduler.decision_counts`) and
# labelled in the `astraea_kv_decisions_total` metric: at a tool call (the key is the action
# alone: "swap"), taking memory back from a job in a tool wait for a ready job
# ("reclaim_swap"), or preempting a running segment ("preempt_discard").
DECISION_CAUSES = {"": "api_wait", "reclaim_": "reclaim", "preempt_": "preemption"}


def decision_key(action: str, cause: str = "api_wait") -> str:
    """The count key of an (action, cause) pair: `decision_labels` undone."""
    for prefix, name in DECISION_CAUSES.items():
        if name == cause:
            return prefix + action
    raise ValueError(f"unknown KV decision cause {cause!r}")


def decision_labels(key: str) -> tuple[str, str]:
    """(action, cause) of a count key: "swap" -> ("swap", "api_wait"), "preempt_discard" ->
    ("discard", "preemption")."""
    for prefix, name in DECISION_CAUSES.items():
        if prefix and key.startswith(prefix):
            return key[len(prefix):], name
    return key, "api_wait"


@dataclass(frozen=True)
class AdmitDecision:
    """Why a job was admitted when it was, so a trace can explain it."""

    job_id: str
    worker_id: int
    queue_level: int  # the job's queue (0 = highest) when it was chosen
    score: float | None  # its HRRN response ratio within that queue; None for other disciplines


@dataclass(frozen=True)
class StepTiming:
    """One engine step's timing (proto `StepTiming`): what a worker reports and the predictor
    fits step time from."""

    tokens: int  # tokens processed (decoded plus prefilled)
    context_tokens_read: int  # KV tokens read by the step's attention, new ones included
    duration_s: float


@dataclass
class WorkerView:
    """What the scheduler knows of one worker's memory when it plans."""

    worker_id: int
    total_blocks: int
    free_blocks: int  # allocatable now (free + evictable prefix-cache blocks)
    block_size: int
    host_free_blocks: int
    running_seqs: int
    max_seqs: int
    running_context_tokens: int  # Σ context of running sequences (the batch's KV reads)
    step_time_s: float  # duration of the current/last step (for the swap budget)
    step_index: int
    swapping_out_blocks: int = 0  # blocks that a swap-out in flight will free
    blocks_of: Callable[[str], int] | None = None  # exact blocks a job holds, where known
    preemptible: Callable[[str], bool] | None = None  # can this running job be preempted now

    @property
    def utilization(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 1.0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def job_blocks(self, job_id: str, tokens: int) -> int:
        """Blocks a job holds: exact where the worker can tell, else those `tokens` need."""
        return self.blocks_of(job_id) if self.blocks_of else self.blocks_for(tokens)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers with (proto `Register`): its model and memory."""

    model: str
    backend: str  # "sim" or "vllm": for logs, nothing branches on it
    # The engine keeps a job's token history: it must be sent it when it does not hold it
    # (proto `Register.needs_history`); the simulated engine recomputes from token counts.
    needs_history: bool
    kv_capacity_blocks: int
    block_size: int
    host_swap_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    profile_name: str
