"""The vLLM scheduler the worker's engine runs: vLLM 0.32's own, plus what the worker must
know about each step.

`VllmEngine` passes this class as `scheduler_cls`, so vLLM still does block allocation,
chunked prefill, batching and prefill order by `Admit.priority` (`scheduling_policy=
"priority"`). What it adds is each step's schedule (`StepSchedule`), which the engine turns
into the worker's reports:
* the tokens scheduled per request (a segment's prefill count, the step's token count) and
  the KV tokens the step's attention reads (`StepTiming.context_tokens_read`);
* the requests vLLM preempted to free blocks for others, with the blocks they held, which the
  engine must drop from the prefix cache (a preempted job's KV is discarded; the control
  plane decides when it runs again).

Resumed sessions and swap-ins (requests holding blocks) go ahead of new prefills whatever
their priority: vLLM keeps them in a queue of their own so that a request whose allocation
fails never blocks one that needs no new blocks (scheduler.py:225). The plan's order across
the two is kept upstream: `VllmEngine` holds admissions ranked behind a swap-in that is
waiting for room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.v1.core.sched.scheduler import Scheduler


@dataclass(frozen=True)
class StepSchedule:
    """What vLLM scheduled for one step, before it ran (its timing is the engine's
    `StepTiming`)."""

    scheduled: dict[str, int]  # request id -> tokens scheduled this step
    tokens: int  # all tokens scheduled
    context_tokens_read: int  # KV tokens the step's attention reads, its own new ones included
    preempted: dict[str, list[int]] = field(default_factory=dict)  # request id -> its blocks


class RecordingScheduler(Scheduler):
    """vLLM's scheduler, recording each `schedule()` in `last_schedule` (None after it is
    read with `take_schedule`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_schedule: StepSchedule | None = None
        self._preempting: dict[str, list[int]] = {}

    def schedule(self, *args, **kwargs):
        self._preempting = {}
        out = super().schedule(*args, **kwargs)
        self.last_schedule = StepSchedule(
            scheduled=dict(out.num_scheduled_tokens),
            tokens=out.total_num_scheduled_tokens,
            # After scheduling, num_computed_tokens includes this step's new tokens.
            context_tokens_read=sum(self.requests[r].num_computed_tokens
                                    for r in out.num_scheduled_tokens),
            preempted=self._preempting)
        return out

    def _preempt_request(self, request, *args, **kwargs) -> None:
        # The blocks are freed (and may be handed out again) inside this call: note them first.
        rid = request.request_id
        self._preempting[rid] = list(self.kv_cache_manager.get_block_ids(rid)[0])
        super()._preempt_request(request, *args, **kwargs)

    def take_schedule(self) -> StepSchedule | None:
        schedule, self.last_schedule = self.last_schedule, None
        return schedule
