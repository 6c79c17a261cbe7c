"""ThunderAgent (arXiv 2602.13692): programs paused and resumed whole under KV memory pressure.

A *program* is an agent job. It is REASONING while a request of it is queued or running and
ACTING while it waits for a tool; independently it is ACTIVE (its requests may run, its KV
counts in its worker's *working set*) or PAUSED (it waits in one global queue; its KV has left
the GPU). The working set of a worker is the context of its ACTIVE programs, as a fraction of
the worker's KV capacity. A control loop runs every `tick_s` (Dynamo's port of the scheduler):

1. soft demote — in the band [soft_demote_threshold, pause_threshold) the ACTING programs a
   pause would take first get a later place for their next request;
2. greedy resume — below pause_threshold − resume_hysteresis, PAUSED programs are resumed in
   the order REASONING (a request waits), new, ACTING, smallest context first inside each,
   as many as fit under that level, placed best-fit-decreasing over the workers; a program
   paused for resume_timeout_s is resumed regardless; with `acting_token_decay` (the
   original's option) an ACTING program counts 2^(−t) of its context here, t the seconds
   since its tool call began, so long tool calls make room for waiting programs;
3. pause until safe — above pause_threshold, ACTING programs are paused (smallest first, the
   paper's shortest-first eviction) until the working set is at pause_target; if that is not
   enough, REASONING programs are marked and pause at their next tool boundary.

A new program is admitted at once when no program waits and its context fits (ThunderAgent
assigns a new program directly when the global queue is empty and a backend has room);
otherwise it waits for a tick. Requests of ACTIVE programs are served first come, first
served (the engine under the router), skipping those that do not fit.
"""

from __future__ import annotations

from astraea.plan import JobState, KvAction, KvDecision, KvState, WorkerView
from astraea.profile import HardwareProfile
from control_plane.core.config import ThunderAgentConfig
from control_plane.core.discipline import CANDIDATE_WINDOW, Discipline
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.job import Job
from control_plane.core.kv_policy import KvPolicy
from control_plane.core.queues import FcfsQueue


class ProgramPauseResume(Discipline):
    """ThunderAgent's program scheduler: which programs are ACTIVE, and their request order."""

    name = "thunderagent"
    static_order = True

    def __init__(self, config: ThunderAgentConfig) -> None:
        self.config = config
        self.kv: ThunderAgentKv | None = None  # chooses how a paused program's KV leaves
        self._ready = FcfsQueue()  # ready segments of ACTIVE programs
        self._active: dict[str, Job] = {}
        self._home: dict[str, int] = {}  # the worker whose working set counts the program
        self._paused: dict[str, Job] = {}  # the global queue of PAUSED programs
        self._paused_since: dict[str, float] = {}
        self._fresh: set[str] = set()  # new programs not yet considered for direct admission
        self._marked: set[str] = set()  # REASONING programs to pause at their tool boundary
        self._offset: dict[str, float] = {}  # queue-key shift of a program's next request
        self._next_tick: float | None = None
        self.pauses = 0
        self.resumes = 0

    # --- program state ----------------------------------------------------------------
    def is_active(self, job_id: str) -> bool:
        return job_id in self._active

    def is_paused(self, job_id: str) -> bool:
        return job_id in self._paused

    def _pause(self, job: Job, now: float) -> None:
        self._active.pop(job.job_id, None)
        self._marked.discard(job.job_id)
        self._offset.pop(job.job_id, None)
        if job in self._ready:
            self._ready.remove(job)
        self._paused[job.job_id] = job
        self._paused_since[job.job_id] = now
        self.pauses += 1

    def _activate(self, job: Job, worker_id: int, boost: bool) -> None:
        self._paused.pop(job.job_id, None)
        self._paused_since.pop(job.job_id, None)
        self._fresh.discard(job.job_id)
        self._active[job.job_id] = job
        self._home[job.job_id] = worker_id
        if boost:
            self._offset[job.job_id] = -self.config.resume_priority_boost_s
            self.resumes += 1
        if job.state is JobState.READY:
            self._push(job)

    def _push(self, job: Job) -> None:
        self._ready.push(job, job.ready_since_s + self._offset.pop(job.job_id, 0.0))

    def take_mark(self, job: Job, now: float) -> bool:
        """At a tool boundary: pause the program if it was marked. True if paused."""
        if job.job_id not in self._marked:
            return False
        self._pause(job, now)
        return True

    def _drop(self, job_id: str) -> None:
        for table in (self._active, self._home, self._paused, self._paused_since, self._offset):
            table.pop(job_id, None)
        self._marked.discard(job_id)
        self._fresh.discard(job_id)

    # --- Discipline -------------------------------------------------------------------
    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        if job.job_id in self._active:
            self._push(job)
        elif job.job_id not in self._paused:  # a new program: the global queue first
            self._paused[job.job_id] = job
            self._paused_since[job.job_id] = now
            self._fresh.add(job.job_id)
        # a PAUSED program whose tool returned waits in the global queue, now REASONING

    def remove(self, job: Job) -> None:
        if job in self._ready:
            self._ready.remove(job)
        if job.state is JobState.FINISHED:  # cancelled
            self._drop(job.job_id)

    def candidates(self, now: float, room: list[int]) -> list[Job]:
        return self._ready.snapshot(CANDIDATE_WINDOW)

    def on_segment_end(self, job: Job, now: float, calls_tool: bool, segment_cost: float,
                       run_s: float) -> None:
        if not calls_tool:
            self._drop(job.job_id)

    def priority_key(self, job: Job, now: float) -> tuple:
        return (0 if job.job_id in self._active else 1, job.ready_since_s)

    def queue_lengths(self) -> list[int]:
        return [len(self._ready), len(self._paused)]

    def next_deadline(self) -> float | None:
        if self._next_tick is None or not (self._active or self._paused):
            return None
        return self._next_tick

    def control_idle(self, now: float) -> bool:
        # Between ticks only new programs make `control` act. (Its sweep of finished
        # programs may wait for the next call: nothing else reads them.)
        return not self._fresh and self._next_tick is not None and now < self._next_tick

    def control(self, now: float, views: dict[int, WorkerView]) -> list[KvDecision]:
        for job_id in [j for j, job in self._active.items() if job.state is JobState.FINISHED]:
            self._drop(job_id)
        out: list[KvDecision] = []
        if self._fresh and len(self._fresh) == len(self._paused):
            # Nothing older waits: new programs go straight in while they fit.
            self._resume(now, views)
        self._fresh.clear()
        if self._next_tick is None or now >= self._next_tick:
            self._next_tick = now + self.config.tick_s
            self._soft_demote(views)
            self._resume(now, views)
            out = self._pause_until_safe(now, views)
        return out

    # --- the control loop -------------------------------------------------------------
    @staticmethod
    def _blocks(job: Job, view: WorkerView) -> int:
        return view.blocks_for(job.context_tokens + job.pending_tokens)

    def _worker_of(self, job: Job, views: dict[int, WorkerView]) -> int:
        w = job.worker_id if job.worker_id in views else self._home.get(job.job_id)
        return w if w in views else next(iter(views))

    def working_sets(self, views: dict[int, WorkerView],
                     decay_at: float | None = None) -> dict[int, int]:
        """Blocks of each worker's ACTIVE programs, less those marked to pause; with
        `decay_at`, an ACTING program's blocks weigh 2^(−seconds it has been ACTING)."""
        ws = dict.fromkeys(views, 0.0)
        for job in self._active.values():
            if job.job_id not in self._marked:
                w = self._worker_of(job, views)
                blocks = self._blocks(job, views[w])
                if decay_at is not None and job.state is JobState.API_WAIT:
                    blocks *= 2.0 ** -(decay_at - job.api_start_s)
                ws[w] += blocks
        return {w: int(-(-b // 1)) for w, b in ws.items()}

    def _acting(self, w: int, views: dict[int, WorkerView]) -> list[Job]:
        acting = [j for j in self._active.values()
                  if j.state is JobState.API_WAIT and self._worker_of(j, views) == w]
        return sorted(acting, key=lambda j: j.context_tokens)

    def _soft_demote(self, views: dict[int, WorkerView]) -> None:
        c = self.config
        ws = self.working_sets(views)
        for w, view in views.items():
            used, total = ws[w], view.total_blocks
            if not c.soft_demote_threshold * total <= used < c.pause_threshold * total:
                continue
            for job in self._acting(w, views):
                if used <= c.pause_target * total:
                    break
                self._offset[job.job_id] = c.soft_demote_priority_jump_s
                used -= self._blocks(job, view)

    def _resume(self, now: float, views: dict[int, WorkerView]) -> None:
        if not self._paused:
            return
        c = self.config
        level = c.pause_threshold - c.resume_hysteresis
        ws = self.working_sets(views, now if c.acting_token_decay else None)
        room = {w: int(level * v.total_blocks) - ws[w] for w, v in views.items()
                if ws[w] < level * v.total_blocks}
        forced = [j for j in self._paused.values()
                  if now - self._paused_since[j.job_id] >= c.resume_timeout_s]

        def group(j: Job) -> int:
            if j.state is JobState.READY and j.segment_index > 0:
                return 0  # REASONING: a request waits for the program
            return 1 if j.segment_index == 0 else 2  # new, then ACTING

        some_view = next(iter(views.values()))
        order = sorted(self._paused.values(),
                       key=lambda j: (group(j), self._blocks(j, some_view), j.arrival_s))
        # Select the most programs whose sum fits the total room, in priority order.
        budget, chosen = sum(room.values()), []
        for job in order:
            need = self._blocks(job, some_view)
            if need <= budget:
                chosen.append(job)
                budget -= need
        # A worker with no ACTIVE program takes the first waiting program whatever its size:
        # the original counts the whole pool as capacity, so it would run it there too.
        idle = [w for w in views if ws[w] == 0]
        if not chosen and idle and order:
            room[idle[0]] = max(room.get(idle[0], 0), self._blocks(order[0], views[idle[0]]))
            chosen.append(order[0])
        for job in forced:
            if job not in chosen:
                chosen.append(job)
        # Best-fit decreasing: the largest program first, to the worker with the most room
        # (a program whose KV sits in a worker's host memory goes back to that worker).
        chosen.sort(key=lambda j: -self._blocks(j, some_view))
        for job in chosen:
            need = self._blocks(job, some_view)
            if job.kv_state is KvState.SWAPPED and job.worker_id in views:
                w = job.worker_id
            else:
                w = max(views, key=lambda x: room.get(x, -(1 << 62)))
            if need > room.get(w, 0) and job not in forced:
                continue
            room[w] = room.get(w, 0) - need
            self._activate(job, w, boost=job.segment_index > 0)

    def _pause_until_safe(self, now: float, views: dict[int, WorkerView]) -> list[KvDecision]:
        c = self.config
        out: list[KvDecision] = []
        ws = self.working_sets(views)
        for w, view in views.items():
            total, used = view.total_blocks, ws[w]
            if used <= c.pause_threshold * total:
                continue
            host = [view.host_free_blocks]
            for job in self._acting(w, views):
                if used <= c.pause_target * total:
                    break
                used -= self._blocks(job, view)
                self._pause(job, now)
                if job.kv_state is KvState.RESIDENT and self.kv is not None:
                    out.append(self.kv.leave_gpu(job, now, view, "paused under memory pressure",
                                                 host))
            reasoning = sorted((j for j in self._active.values()
                                if j.state in (JobState.READY, JobState.RUNNING)
                                and j.job_id not in self._marked
                                and self._worker_of(j, views) == w),
                               key=lambda j: j.context_tokens)
            for job in reasoning:
                if used <= c.pause_target * total:
                    break
                used -= self._blocks(job, view)
                self._marked.add(job.job_id)
        return out


class ThunderAgentKv(KvPolicy):
    """An ACTIVE program keeps its KV through a tool call; a paused one's KV leaves the GPU."""

    name = "thunderagent"

    def __init__(self, profile: HardwareProfile, estimator: ServiceTimeEstimator,
                 programs: ProgramPauseResume) -> None:
        super().__init__(profile, estimator)
        self.programs = programs
        programs.kv = self

    def leave_gpu(self, job: Job, now: float, view: WorkerView, reason: str,
                  host_left: list[int]) -> KvDecision:
        """Host memory when it has room and the wait outlasts the copy (Dynamo's port counts
        the host tier in its budget), else dropped and recomputed on resume. `host_left[0]`
        is the host room not yet promised to decisions of the same plan; it is updated."""
        remaining = self.estimator.remaining_api_s(job, now)
        inputs = {"remaining_api_s": remaining, "context_tokens": job.context_tokens}
        blocks = view.blocks_for(job.kv_positions)
        if host_left[0] >= blocks and remaining > 2 * self.profile.swap_time_s(job.context_tokens):
            host_left[0] -= blocks
            return KvDecision(job.job_id, KvAction.SWAP, reason + ": to host", inputs)
        return KvDecision(job.job_id, KvAction.DISCARD, reason + ": dropped", inputs)

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        host = [view.host_free_blocks]
        if self.programs.take_mark(job, now):
            return self.leave_gpu(job, now, view, "marked program paused at its tool boundary", host)
        if not self.programs.is_active(job.job_id):
            return self.leave_gpu(job, now, view, "program is paused", host)
        return KvDecision(job.job_id, KvAction.PRESERVE, "ACTIVE program: KV kept while ACTING")

    def reclaim(self, now: float, paused: list[Job], view: WorkerView,
                blocks_needed: int) -> list[KvDecision]:
        """A request of an ACTIVE program does not fit: the engine evicts the cached KV of
        ACTING programs, least recently used first, as vLLM's prefix cache would."""
        out, freed, host = [], 0, [view.host_free_blocks]
        for job in sorted(paused, key=lambda j: j.api_start_s):
            if freed >= blocks_needed:
                break
            freed += view.blocks_for(job.kv_positions)
            out.append(self.leave_gpu(job, now, view, "evicted for an active request", host))
        return out
