"""MARS (arXiv 2604.26963): agent admission separated from execution, agent-centric queues, and
KV kept through a tool wait only when a warm resumption pays back the memory it holds.

What the paper's public text gives (its abstract; the body was not available to us): an
external control plane admits agents so that GPU and CPU resources are not oversubscribed,
separately from the engine that executes them; an agent-centric scheduler shortens the
end-to-end critical path by prioritising latency-sensitive continuations; KV is retained
during a tool call only when warm resumption yields a latency benefit; summaries of the paper
name AIMD-based admission and multi-level feedback queues. How each is built here (our
choices, each taken to favour MARS):

* admission — new agents wait in an admission queue; at most `window` admitted agents are
  unfinished at once. Every `control_period_s` the window grows by `additive_increase` while
  agents wait and no worker is congested, and is multiplied by `multiplicative_decrease` (not
  below `min_window`) when one is: KV use ≥ `congestion_utilization` with admitted work
  queued, or a preemption since the last period. Tool execution is not contended in the
  simulator, so the CPU side of the admission signal never fires here.
* order — continuations (segments after a tool returned) before the first segments of newly
  admitted agents; inside each, feedback levels by the agent's attained GPU service
  (boundaries doubling from 1 s); first come, first served inside a level; the batch is
  filled past jobs that do not fit.
* KV at a tool call — warm benefit B = the cheapest cold resumption (recompute the context,
  or reload it from host memory); memory cost M = predicted wait × share of the worker's KV
  the context holds × the worker's KV utilisation. Keep on the GPU if B ≥ M, else offload to
  host memory when it has room and the wait outlasts the copy, else drop. When a ready job
  does not fit, preserved KV is evicted, the largest (wait × size) first.
"""

from __future__ import annotations

from collections.abc import Iterator

from astraea.plan import JobState, KvAction, KvDecision, WorkerView
from control_plane.core.config import MarsConfig
from control_plane.core.discipline import CANDIDATE_WINDOW, Discipline
from control_plane.core.job import Job
from control_plane.core.kv_policy import KvPolicy
from control_plane.core.queues import FcfsQueue


class AgentAdmission(Discipline):
    """MARS's control plane (AIMD admission window) and agent-centric ready queues."""

    name = "mars"
    static_order = True

    def __init__(self, config: MarsConfig) -> None:
        self.config = config
        self.window = float(config.initial_window)
        self._waiting = FcfsQueue()  # agents not admitted yet, by arrival
        self._admitted: set[str] = set()
        # Continuations by feedback level, then first segments of admitted agents.
        self._queues = [FcfsQueue() for _ in range(len(config.boundaries_s) + 2)]
        self._where: dict[str, int] = {}
        self._preempted = False
        self._next_period: float | None = None

    def level_for_service(self, service_s: float) -> int:
        for i, bound in enumerate(self.config.boundaries_s):
            if service_s < bound:
                return i
        return len(self.config.boundaries_s)

    def _queue_index(self, job: Job) -> int:
        if job.segment_index == 0:
            return len(self._queues) - 1  # a new agent's first segment: after continuations
        return self.level_for_service(job.attained_s)

    def is_admitted(self, job_id: str) -> bool:
        return job_id in self._admitted

    # --- Discipline -------------------------------------------------------------------
    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        if job.job_id not in self._admitted:
            self._waiting.push(job, job.arrival_s)
            return
        i = self._queue_index(job)
        self._where[job.job_id] = i
        self._queues[i].push(job, job.ready_since_s)

    def remove(self, job: Job) -> None:
        i = self._where.pop(job.job_id, None)
        if i is not None:
            self._queues[i].remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        if job.state is JobState.FINISHED:  # cancelled
            self._admitted.discard(job.job_id)

    def candidates(self, now: float, room: list[int]) -> Iterator[Job]:
        for queue in self._queues:
            yield from queue.snapshot(CANDIDATE_WINDOW)

    def on_segment_end(self, job: Job, now: float, calls_tool: bool, segment_cost: float,
                       run_s: float) -> None:
        job.attained_s += run_s
        if not calls_tool:
            self._admitted.discard(job.job_id)

    def on_preempted(self, job: Job, now: float) -> None:
        job.attained_s += now - (job.running_since_s if job.running_since_s is not None else now)
        self._preempted = True

    def priority_key(self, job: Job, now: float) -> tuple:
        if job.job_id not in self._admitted:
            return (len(self._queues), job.arrival_s)
        return (self._queue_index(job), job.ready_since_s)

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self._queues] + [len(self._waiting)]

    def level_of(self, job: Job) -> int:
        return self._where.get(job.job_id, len(self._queues))

    def next_deadline(self) -> float | None:
        return self._next_period if len(self._waiting) else None

    def control_idle(self, now: float) -> bool:
        # `control` acts only on a first call, at a period's end or with room in the window,
        # and each of those needs agents waiting.
        return self._next_period is not None and not (
            len(self._waiting) and (now >= self._next_period or len(self._admitted) < int(self.window)))

    def control(self, now: float, views: dict[int, WorkerView]) -> list[KvDecision]:
        c = self.config
        if self._next_period is None:
            self._next_period = now + c.control_period_s  # the first period starts now
        elif len(self._waiting) and now >= self._next_period:
            self._next_period = now + c.control_period_s
            queued = any(len(q) for q in self._queues)
            congested = self._preempted or (queued and any(
                v.utilization >= c.congestion_utilization for v in views.values()))
            self._preempted = False
            if congested:
                self.window = max(float(c.min_window), self.window * c.multiplicative_decrease)
            else:
                self.window = min(float(c.max_window), self.window + c.additive_increase)
        # Admission at every plan, while the window has room.
        while len(self._waiting) and len(self._admitted) < int(self.window):
            job = next(iter(self._waiting))
            self._waiting.remove(job)
            self._admitted.add(job.job_id)
            if job.state is JobState.READY:
                self.add(job, now, 0.0, 0)
        return []


class WarmResumption(KvPolicy):
    """Keep KV through a tool call only when the warm resumption is worth its memory."""

    name = "warm-resumption"

    def _cold_resume_s(self, job: Job, view: WorkerView) -> tuple[float, bool]:
        """The cheapest way back without the KV on the GPU, and whether it is the host copy."""
        recompute = self.profile.prefill_time_s(job.context_tokens)
        if self._can_swap(job, view):
            reload = self.profile.swap_time_s(job.context_tokens)
            if reload < recompute:
                return reload, True
        return recompute, False

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        remaining = self.estimator.remaining_api_s(job, now)
        benefit, via_host = self._cold_resume_s(job, view)
        capacity = max(view.total_blocks * view.block_size, 1)
        cost = remaining * (job.context_tokens / capacity) * view.utilization
        inputs = {"remaining_api_s": remaining, "warm_benefit_s": benefit,
                  "memory_cost_s": cost, "utilization": view.utilization}
        if benefit >= cost:
            return KvDecision(job.job_id, KvAction.PRESERVE, "warm resumption pays", inputs)
        return self._leave(job, view, remaining, via_host, "warm resumption does not pay", inputs)

    def _leave(self, job: Job, view: WorkerView, remaining: float, via_host: bool,
               reason: str, inputs: dict) -> KvDecision:
        round_trip = 2 * self.profile.swap_time_s(job.context_tokens)
        if via_host and remaining > round_trip:
            return KvDecision(job.job_id, KvAction.SWAP, reason + ": offloaded to host", inputs)
        return KvDecision(job.job_id, KvAction.DISCARD, reason + ": dropped", inputs)

    def reclaim(self, now: float, paused: list[Job], view: WorkerView,
                blocks_needed: int) -> list[KvDecision]:
        scored = sorted(paused, key=lambda j: -self.estimator.remaining_api_s(j, now) * j.context_tokens)
        out, freed, host_left = [], 0, view.host_free_blocks
        for job in scored:
            if freed >= blocks_needed:
                break
            blocks = view.blocks_for(job.kv_positions)
            freed += blocks
            remaining = self.estimator.remaining_api_s(job, now)
            via_host = host_left >= blocks
            d = self._leave(job, view, remaining, via_host, "evicted for a ready job",
                            {"remaining_api_s": remaining, "blocks_needed": blocks_needed})
            if d.action is KvAction.SWAP:
                host_left -= blocks
            out.append(d)
        return out
