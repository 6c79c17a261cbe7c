"""Stateful-MLFQ: token-cost quotas, promotion on API yields, HRRN inside levels.

* m levels, Q0 highest; level k's quota is `quota_base · quota_growth**k` token cost.
* A new job enters Q0. At a segment end: cost above the level's quota → compute-intensive,
  demoted one level; an API yield within the quota → I/O-intensive, promoted one level.
* Inside a level, highest response ratio (W + T) / T first, W = accumulated ready-but-waiting
  time, T = predicted compute time of the current segment. Astraea's defaults also credit
  the job's progress in W (`age_weight`) and use T**`t_exponent` (docs/results/
  tail-tuning.md); age_weight 0 and t_exponent 1 are the paper's rule.
* Aging: a job in the lowest level whose response ratio exceeds `aging_ratio` moves to Q0.
* Work-conserving fill across levels by default; `work_conserving=False` is the paper's
  "first non-empty queue only" reading.
* A new job with a long prompt waits while the KV of the jobs under way would not leave it
  room (`new_job_kv_share`; the scheduler applies it, it knows the workers' memory).
"""

from __future__ import annotations

from collections.abc import Iterator

from control_plane.core.config import MlfqConfig
from control_plane.core.discipline import Discipline
from control_plane.core.job import Job
from control_plane.core.queues import HrrnQueue

# Aging is a starvation guard over waits of seconds; checking it every 10 ms is plenty and
# keeps it off most batch builds.
AGING_PERIOD_S = 0.01
# Gap between levels in the worker's prefill priority: larger than any aged term can grow
# (the aged term is seconds since the discipline started / the aging ratio).
LEVEL_PRIORITY_GAP = 1e9


class StatefulMlfq(Discipline):
    name = "stateful-mlfq"

    def __init__(self, config: MlfqConfig) -> None:
        if config.num_levels < 1:
            raise ValueError("mlfq.num_levels must be at least 1")
        self.config = config
        self.new_job_kv_share = config.new_job_kv_share
        self.new_jobs_wait = config.new_jobs_wait_for_blocked
        self._levels = [HrrnQueue() for _ in range(config.num_levels)]
        self._predicted: dict[str, tuple[float, int]] = {}
        self._last_aging_s = float("-inf")
        self._epoch_s: float | None = None  # first `now` seen by engine_priority
        self._last_ratio = 0.0  # response ratio of the candidate offered last

    @property
    def reserving(self) -> bool:
        """The candidate offered last is starving: its response ratio is `reserve_ratio` or
        more."""
        reserve = self.config.reserve_ratio
        return reserve > 0 and self._last_ratio >= reserve

    def add(self, job: Job, now: float, predicted_s: float, need_blocks: int) -> None:
        self._predicted[job.job_id] = (predicted_s, need_blocks)
        self._push(self._levels[job.level], job, predicted_s, need_blocks)

    def _push(self, level: HrrnQueue, job: Job, predicted_s: float, need_blocks: int) -> None:
        # W_eff(now) = W(now) + a·(now − arrival − W(now)): the queue stores W as an offset
        # from `now`, so the age share is a constant offset too.
        a = self.config.age_weight
        offset = -a * (job.waiting_s - job.ready_since_s + job.arrival_s) if a else 0.0
        gamma = self.config.t_exponent
        t = predicted_s if gamma == 1.0 else max(predicted_s, 1e-6) ** gamma
        level.push(job, t, need_blocks, offset)

    def remove(self, job: Job) -> None:
        self._levels[job.level].remove(job)
        self._predicted.pop(job.job_id, None)

    def _age(self, now: float) -> None:
        lowest = self._levels[-1]
        if len(self._levels) == 1 or not len(lowest) or now - self._last_aging_s < AGING_PERIOD_S:
            return
        self._last_aging_s = now
        for job in lowest.over_ratio(now, self.config.aging_ratio):
            lowest.remove(job)
            job.level = 0
            predicted, need = self._predicted[job.job_id]
            self._push(self._levels[0], job, predicted, need)

    def candidates(self, now: float, room: list[int]) -> Iterator[Job]:
        self._age(now)
        reserve = self.config.reserve_ratio > 0
        for level in self._levels:
            if len(level):
                for job in level.ranked(now, room):
                    if reserve:
                        self._last_ratio = level.score_of(job, now)
                    yield job
                if not self.config.work_conserving:
                    return

    def on_segment_end(self, job: Job, now: float, calls_tool: bool, segment_cost: float,
                       run_s: float) -> None:
        if segment_cost > self.config.quota(job.level):
            job.level = min(job.level + 1, self.config.num_levels - 1)
        elif calls_tool and self.config.promote_on_api_yield:
            job.level = max(job.level - 1, 0)

    def priority_key(self, job: Job, now: float) -> tuple:
        level = self._levels[job.level]
        score = level.score_of(job, now) if job in level else 0.0
        return (job.level, -score)

    def engine_priority(self, job: Job, now: float, predicted_s: float) -> float:
        """Inside the worker too, higher levels first and, within a level, the shorter
        predicted segment first: a 25-token tool result should not wait for the budget
        behind a 1,500-token first prompt admitted a moment earlier. With
        `prefill_aging_ratio` R > 0 the admission time counts too (key = T + t_admit / R),
        so that prompt is overtaken only by segments admitted within R·ΔT after it."""
        if not self.config.prioritize_prefill:
            return 0.0
        key = predicted_s
        ratio = self.config.prefill_aging_ratio
        if ratio > 0:
            if self._epoch_s is None:
                self._epoch_s = now
            key += (now - self._epoch_s) / ratio
        return job.level * LEVEL_PRIORITY_GAP + key

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self._levels]

    def level_of(self, job: Job) -> int:
        return job.level

    def response_ratio(self, job: Job, now: float) -> float:
        level = self._levels[job.level]
        return level.score_of(job, now) if job in level else 0.0

    def admission_score(self, job: Job, now: float) -> float | None:
        return self.response_ratio(job, now)
