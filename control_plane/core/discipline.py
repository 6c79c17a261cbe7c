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
SPAN = 16  # jobs per run whose least need `Plas.candidates` keeps


class Discipline:
    name = "base"
    blocking = False  # stop at the first candidate that does not fit (vLLM's waiting queue)
    preemptive = False  # may preempt running segments of lower priority
    # `candidates` has no side effects and its order and filter do not depend on `now`: an
    # empty plan then stays empty until an event, a control tick or more free memory.
    static_order = False
    # A job not yet started with a long prompt is admitted only while the KV of the jobs under
    # way on its worker plus its own fits in this share of its blocks (0: off; admission.py).
    new_job_kv_share = 0.0
    # True: once a candidate does not fit a worker's memory, no job that has not started yet
    # is admitted to that worker behind it in the same plan (jobs under way still may be).
    new_jobs_wait = False

    @property
    def reserving(self) -> bool:
        """Asked after a candidate did not fit: whether it is starving, so the memory freed
        next should wait for it (the scheduler stops the fill only where that memory comes
        back fast). Default: no reserve."""
        return False

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

    def has_waiting(self) -> bool:
        """Whether any job is queued (`any(queue_lengths())`, which a discipline may answer
        without counting)."""
        return any(self.queue_lengths())

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
        # Per level, the least need of each run of SPAN jobs of its candidate window, kept
        # until a job enters or leaves the window: an overloaded level holds thousands of
        # jobs that do not fit, and `candidates` passes over whole runs of them at once.
        self._window_least: list[tuple | None] = [None] * len(self._levels)
        self._needs: list[list[int]] = [[] for _ in self._levels]  # in each level's order
        self._adds = 0  # jobs added so far: a build that re-adds a job changes its need

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
        self._push(level, job)

    def remove(self, job: Job) -> None:
        self._pop(self._level.pop(job.job_id), job)
        del self._need[job.job_id]

    def _push(self, level: int, job: Job) -> None:
        self._adds += 1
        i = self._levels[level].push(job, job.ready_since_s)
        self._needs[level].insert(i, self._need[job.job_id])
        if i < CANDIDATE_WINDOW:
            self._window_least[level] = None

    def _pop(self, level: int, job: Job) -> None:
        i = self._levels[level].remove(job)
        del self._needs[level][i]
        if i < CANDIDATE_WINDOW:
            self._window_least[level] = None

    def _least_needs(self, level: int) -> tuple[list[int], list[int]]:
        """Per run of the level's window: the least need in the run, and from the run on."""
        least = self._window_least[level]
        if least is None:
            needs = self._needs[level]
            end = min(len(needs), CANDIDATE_WINDOW)
            runs = [min(needs[i:min(i + SPAN, end)]) for i in range(0, end, SPAN)]
            rest = runs[:]
            for b in range(len(rest) - 2, -1, -1):
                rest[b] = min(rest[b], rest[b + 1])
            least = self._window_least[level] = (runs, rest)
        return least

    def _promote_starved(self, now: float) -> None:
        if now - self._last_starvation_check < 0.05:  # a starvation guard needs no finer clock
            return
        self._last_starvation_check = now
        beta = self.config.starvation_ratio
        for i, level in enumerate(self._levels[1:], start=1):
            lower_bound = self.config.boundaries_s[i - 1]
            starved = []
            for job in level:  # oldest first; younger jobs of this level wait less
                waited = job.waiting_now(now)
                if waited <= beta * lower_bound:
                    break
                since = job.running_since_s  # `service_s`, inline: thousands of jobs wait
                service = job.attained_s + (now - since if since is not None else 0.0)
                if waited / max(service, 1e-3) > beta:
                    starved.append(job)
            for job in starved:
                self._pop(i, job)
                self._level[job.job_id] = 0
                self._push(0, job)

    def candidates(self, now: float, room: list[int]) -> Iterator[Job]:
        self._promote_starved(now)
        need = self._need
        for index, level in enumerate(self._levels):
            if not self._needs[index]:
                continue
            window = level.snapshot(CANDIDATE_WINDOW)
            (runs, rest), adds = self._least_needs(index), self._adds
            pos, end = 0, len(window)
            needs = self._needs[index][:end]  # `need` of each job of `window`
            while pos < end:
                if self._adds != adds:  # a re-added job may have a new need: ask each one
                    job = window[pos]
                    pos += 1
                    if need[job.job_id] <= room[0]:
                        yield job
                    continue
                # A run none of whose jobs fits is passed at once, and the level once none
                # to the window's end does (the builder only lowers `room` when handed a job).
                if pos % SPAN == 0 and runs[pos // SPAN] > room[0]:
                    if rest[pos // SPAN] > room[0]:
                        break
                    pos += SPAN
                    continue
                pos += 1
                if needs[pos - 1] <= room[0]:
                    yield window[pos - 1]

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

    def has_waiting(self) -> bool:
        return bool(self._level)

    def level_of(self, job: Job) -> int:
        return self._level.get(job.job_id, self.level_for_service(job.attained_s))
