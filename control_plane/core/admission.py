"""Admission of new jobs against the KV of the jobs already under way (`mlfq.new_job_kv_share`).

A long prompt (one that needs more than the 1 − share of the worker's KV blocks the share
leaves free) of a job that has not started is admitted only if it plus the whole contexts of
the worker's jobs under way that run, hold their KV while ready, or are predicted back from
their API wait within the new job's predicted compute time fit in the share. Otherwise it
gets in by reclaiming the KV of jobs due back in a moment, and every job then runs slower
(docs/results/long-context-tuning.md). Jobs under way that wait in the queue without KV are
left to the discipline's order; a prompt larger than the share alone is not held, nor one
whose room free copies make (`kv.free_copy_step_share`: the contexts it displaces go to the
host and back within a step). On a pool so small that ordinary prompts need a tenth of it,
holding those only starved them (docs/results/tiny-agent.md). Pure, like the rest of the core.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from astraea.plan import JobState, KvState, WorkerView
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.job import Job


class NewJobGate:
    def __init__(self, share: float, watermark: float, estimator: ServiceTimeEstimator,
                 free_copy: Callable[[WorkerView | None, int], bool]) -> None:
        self.share = share  # 0: every new job passes
        self.watermark = watermark
        self.estimator = estimator
        self.free_copy = free_copy  # whether copying that many blocks of KV delays nobody
        # Per worker: jobs admitted to it at least once and not finished, wherever their KV is.
        self.under_way: dict[int, dict[str, Job]] = {}
        self._sums: dict[int, list] = {}  # per worker, within one plan: see `_blocks`

    # --- bookkeeping ----------------------------------------------------------------------
    def admitted(self, job: Job, worker_id: int) -> None:
        """Before the job's worker changes to `worker_id`."""
        if job.worker_id is not None and job.worker_id != worker_id:
            self.under_way.get(job.worker_id, {}).pop(job.job_id, None)
        self.under_way.setdefault(worker_id, {})[job.job_id] = job
        self._sums.pop(worker_id, None)  # counted afresh if asked again in this plan

    def finished(self, job: Job) -> None:
        if job.worker_id is not None:
            self.under_way.get(job.worker_id, {}).pop(job.job_id, None)

    def worker_lost(self, worker_id: int) -> None:
        self.under_way.pop(worker_id, None)

    def new_plan(self) -> None:
        self._sums.clear()

    # --- the test -------------------------------------------------------------------------
    def fits(self, job: Job, now: float, view: WorkerView, need: int,
             predicted_s: Callable[[Job], float]) -> bool:
        """Whether `job`, needing `need` blocks, may be admitted to the worker of `view`
        (`predicted_s(job)`: its predicted compute time). Jobs under way always may."""
        if self.share <= 0 or job.worker_id is not None:
            return True
        if need < (1 - self.share) * view.total_blocks:
            return True  # a prompt that fits in the headroom the share leaves displaces little
        if self.free_copy(view, need):
            return True  # the contexts it displaces go to the host and back at no one's cost
        room = self.share * view.total_blocks - int(self.watermark * view.total_blocks) - need
        if room < 0:
            return True  # a prompt larger than the share could never pass: not held
        entry = self._sums.get(view.worker_id)
        if entry is None:
            entry = self._sums[view.worker_id] = self._blocks(view)
        base, waiting, waiting_blocks, by_return = entry
        if base + waiting_blocks <= room:
            return True
        if base > room:
            return False
        if by_return is None:  # the predicted waits, only when they decide
            ranked = sorted((self.estimator.remaining_api_s(j, now), b) for j, b in waiting)
            sums = [0]
            for _, blocks in ranked:
                sums.append(sums[-1] + blocks)
            by_return = entry[3] = ([r for r, _ in ranked], sums)
        returns, sums = by_return
        return base + sums[bisect.bisect_left(returns, predicted_s(job))] <= room

    def _blocks(self, view: WorkerView) -> list:
        """The worker's jobs under way, in blocks of their whole contexts: [those running or
        ready with resident KV, the (job, blocks) in API waits, their blocks, None]."""
        bs = view.block_size
        base, waiting, waiting_blocks = 0, [], 0
        for j in self.under_way.get(view.worker_id, {}).values():
            blocks = -(-(j.context_tokens + j.pending_tokens) // bs)
            if j.state is JobState.API_WAIT:
                waiting.append((j, blocks))
                waiting_blocks += blocks
            elif j.state is JobState.RUNNING or j.kv_state is KvState.RESIDENT:
                base += blocks
        return [base, waiting, waiting_blocks, None]
