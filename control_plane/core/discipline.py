"""Queue disciplines: who among the ready segments goes first.

A discipline orders ready jobs and keeps its own levels; the scheduler asks it for candidates
and tells it about segment ends. Blocking disciplines stop filling the batch at the first
candidate that does not fit (vLLM's waiting loop breaks there); the others skip it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from astraea.plan import KvDecision, WorkerView
from control_plane.core.config import PlasConfig
from control_plane.core.job import Job
from control_plane.core.queues import FcfsQueue

# A build admits at most max_num_seqs jobs and gives up after 64 misses in a row, so looking
# past the first few hundred jobs of a FCFS-ordered queue can never change its outcome.
CANDIDATE_WINDOW = 512


class Discipline:
    name = "base"
    blocking = False  # stop at the first candidate that does not fit
    preemptive = False  # may preempt running segments of lower priority
    # `candidates` has no side effects and its order and filter do not depend on `now`: an
    # empty plan then stays empty until an event, a control tick or more free memory.
    static_order = False

    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        raise NotImplementedError

    def remove(self, job: Job) -> None:
        raise NotImplementedError

    def candidates(self, now: float, room: list[int]) -> Iterable[Job]:
        """Ready jobs in priority order. The caller admits (removes) jobs while iterating,
        and keeps `room[0]` at the most KV blocks any worker can still give: a discipline
        may skip jobs that need more (the caller re-checks every job anyway)."""
        raise NotImplementedError

    def on_segment_end(self, job: Job, now: float, calls_tool: bool, segment_cost: float,
                       run_s: float) -> None:
        """Bookkeeping when a job's segment ends (before it re-enters the queue)."""

    def on_preempted(self, job: Job, now: float) -> None:
        """A running segment was preempted; it will be added again."""

    def priority_key(self, job: Job, now: float) -> tuple:
        """Smaller is more important; compares ready and running jobs (preemption)."""
        return (0,)

    def queue_lengths(self) -> list[int]:
        raise NotImplementedError

    def engine_priority(self, job: Job, now: float, predicted_s: float) -> float:
        """The order in which the worker should give prefill budget to admitted segments
        (lower first). Default: none, so the worker keeps admission order (vLLM FCFS)."""
        return 0.0

    def level_of(self, job: Job) -> int:
        return 0

    def admission_score(self, job: Job, now: float) -> float | None:
        """The score that ranked `job` within its queue, for traces; None if the discipline
        ranks by something other than a score (arrival order, attained service)."""
        return None

    def control(self, now: float, views: dict[int, WorkerView]) -> list[KvDecision]:
        """A control loop run at the start of every plan, for disciplines that admit whole
        programs (ThunderAgent, MARS): it may change which jobs `candidates` offers, and
        returns KV evictions of jobs preserved in API waits. Default: nothing."""
        return []

    def next_deadline(self) -> float | None:
        """When `control` wants a plan even if no event arrives (a periodic tick)."""
        return None

    def control_idle(self, now: float) -> bool:
        """True when `control` would certainly do nothing at `now` (lets the simulator skip
        plans that cannot act). A discipline that overrides `control` must override this
        too, or it is never idle."""
        return type(self).control is Discipline.control


class Fcfs(Discipline):
    """First come, first served on a fixed key, blocking like vLLM's waiting queue.

    `by="segment"`: each segment is a new request ordered by the time it became ready, and a
    preempted segment goes back to the front (vLLM). `by="job"`: ordered by the job's arrival,
    so a returning job keeps its place (InferCept, Continuum).
    """

    blocking = True
    static_order = True

    def __init__(self, by: str) -> None:
        if by not in ("segment", "job"):
            raise ValueError("by must be 'segment' or 'job'")
        self.by = by
        self.name = f"fcfs-by-{by}"
        self._queue = FcfsQueue()
        self._front = itertools.count()  # later preemptions go in front of earlier ones
        self._preempted: set[str] = set()

    def _key(self, job: Job) -> float:
        if self.by == "job":
            return job.arrival_s
        if job.job_id in self._preempted:
            self._preempted.discard(job.job_id)
            return -1e12 - next(self._front)  # before any time: vLLM prepends preempted work
        return job.ready_since_s

    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        self._queue.push(job, self._key(job))

    def remove(self, job: Job) -> None:
        self._queue.remove(job)

    def candidates(self, now: float, room: list[int]) -> list[Job]:
        return self._queue.snapshot(CANDIDATE_WINDOW)

    def on_preempted(self, job: Job, now: float) -> None:
        self._preempted.add(job.job_id)

    def priority_key(self, job: Job, now: float) -> tuple:
        return (job.arrival_s if self.by == "job" else job.ready_since_s,)

    def queue_lengths(self) -> list[int]:
        return [len(self._queue)]


class Plas(Discipline):
    """Autellix's program-level least attained service, discretised into queues.

    A call enters the queue of its program's attained service (wall time its earlier calls
    ran, plus this call's so far); FCFS inside a queue; a call waiting longer than
    `starvation_ratio` × its program's service goes to the top queue; a higher-queue call
    may preempt running calls of lower queues.
    """

    name = "plas"
    preemptive = True

    def __init__(self, config: PlasConfig) -> None:
        self.config = config
        self.preemptive = config.preemptive
        self._levels = [FcfsQueue() for _ in range(len(config.boundaries_s) + 1)]
        self._level: dict[str, int] = {}
        self._need: dict[str, int] = {}
        self._last_starvation_check = -1.0

    def level_for_service(self, service_s: float) -> int:
        for i, bound in enumerate(self.config.boundaries_s):
            if service_s < bound:
                return i
        return len(self.config.boundaries_s)

    @staticmethod
    def service_s(job: Job, now: float) -> float:
        running_since = job.running_since_s
        return job.attained_s + (now - running_since if running_since is not None else 0.0)

    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        level = self.level_for_service(self.service_s(job, now))
        self._level[job.job_id] = level
        self._need[job.job_id] = need_blocks
        self._levels[level].push(job, job.ready_since_s)

    def remove(self, job: Job) -> None:
        self._levels[self._level.pop(job.job_id)].remove(job)
        del self._need[job.job_id]

    def _promote_starved(self, now: float) -> None:
        if now - self._last_starvation_check < 0.05:  # a starvation guard needs no finer clock
            return
        self._last_starvation_check = now
        top = self._levels[0]
        beta = self.config.starvation_ratio
        for i, level in enumerate(self._levels[1:], start=1):
            lower_bound = self.config.boundaries_s[i - 1]
            starved = []
            for job in level:  # oldest first; younger jobs of this level wait less
                if job.waiting_now(now) <= beta * lower_bound:
                    break
                if job.waiting_now(now) / max(self.service_s(job, now), 1e-3) > beta:
                    starved.append(job)
            for job in starved:
                level.remove(job)
                self._level[job.job_id] = 0
                top.push(job, job.ready_since_s)

    def candidates(self, now: float, room: list[int]) -> Iterator[Job]:
        self._promote_starved(now)
        need = self._need
        for level in self._levels:
            for job in level.snapshot(CANDIDATE_WINDOW):
                if need[job.job_id] <= room[0]:
                    yield job

    def on_segment_end(self, job: Job, now: float, calls_tool: bool, segment_cost: float,
                       run_s: float) -> None:
        job.attained_s += run_s

    def on_preempted(self, job: Job, now: float) -> None:
        # The partial call's service counts: it ran.
        job.attained_s += now - (job.running_since_s if job.running_since_s is not None else now)

    def priority_key(self, job: Job, now: float) -> tuple:
        level = self._level.get(job.job_id)
        if level is None:
            level = self.level_for_service(self.service_s(job, now))
        return (level, job.ready_since_s)

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self._levels]

    def level_of(self, job: Job) -> int:
        return self._level.get(job.job_id, self.level_for_service(job.attained_s))
