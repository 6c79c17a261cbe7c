"""Ready queues: the orders in which ready segments are offered to the batch builder.

Two shapes, like vLLM's `RequestQueue`: `FcfsQueue` (ordered by a fixed key, optionally with a
front for preempted work) and `HrrnQueue` (highest response ratio next, whose order changes
with time and is therefore computed at each build, vectorised so 1,000 jobs rank in
microseconds).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

import numpy as np

from control_plane.core.job import Job


class FcfsQueue:
    """Jobs in ascending order of a key fixed at insertion (e.g. arrival time)."""

    def __init__(self) -> None:
        self._keys: list[tuple[float, int]] = []
        self._jobs: list[Job] = []
        self._where: dict[str, tuple[float, int]] = {}
        self._tiebreak = itertools.count()

    def push(self, job: Job, key: float) -> int:
        """Queue `job` by `key`; returns its position (0: first)."""
        if job.job_id in self._where:
            raise KeyError(f"job {job.job_id} already queued")
        k = (key, next(self._tiebreak))
        i = bisect.bisect_right(self._keys, k)
        self._keys.insert(i, k)
        self._jobs.insert(i, job)
        self._where[job.job_id] = k
        return i

    def remove(self, job: Job) -> int:
        """Take `job` out; returns the position it had."""
        k = self._where.pop(job.job_id)
        i = bisect.bisect_left(self._keys, k)
        del self._keys[i]
        del self._jobs[i]
        return i

    def __contains__(self, job: Job) -> bool:
        return job.job_id in self._where

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        """In key order. Do not push or remove while iterating."""
        return iter(self._jobs)

    def snapshot(self, limit: int | None = None) -> list[Job]:
        """The first `limit` jobs (all by default), as a list safe to iterate while removing."""
        return self._jobs[:limit] if limit is not None else list(self._jobs)


TOP_K = 16


class HrrnQueue:
    """Highest response ratio next: score = (W + T) / T.

    W grows with time for every queued job, so a job's W is stored as `W(now) = b + now` with
    `b = accumulated wait − ready_since`, and the ranking is one vectorised pass at build time.
    Rows are kept dense (a removal moves the last row into the hole).
    """

    def __init__(self, capacity: int = 256) -> None:
        self._b = np.empty(capacity)
        self._t = np.empty(capacity)
        self._need = np.empty(capacity, dtype=np.int64)
        self._jobs: list[Job] = []
        self._row: dict[str, int] = {}

    def push(self, job: Job, predicted_s: float, need_blocks: int,
             wait_offset_s: float = 0.0) -> None:
        """`wait_offset_s` is added to the job's W (a caller's credit for other time)."""
        if job.job_id in self._row:
            raise KeyError(f"job {job.job_id} already queued")
        n = len(self._jobs)
        if n == len(self._b):
            self._b = np.resize(self._b, 2 * n)
            self._t = np.resize(self._t, 2 * n)
            self._need = np.resize(self._need, 2 * n)
        self._b[n] = job.waiting_s - job.ready_since_s + wait_offset_s
        self._t[n] = max(predicted_s, 1e-6)
        self._need[n] = need_blocks
        self._jobs.append(job)
        self._row[job.job_id] = n

    def remove(self, job: Job) -> None:
        i = self._row.pop(job.job_id)
        last = len(self._jobs) - 1
        if i != last:
            moved = self._jobs[last]
            self._jobs[i] = moved
            self._b[i], self._t[i], self._need[i] = self._b[last], self._t[last], self._need[last]
            self._row[moved.job_id] = i
        self._jobs.pop()

    def __contains__(self, job: Job) -> bool:
        return job.job_id in self._row

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs))

    def scores(self, now: float) -> np.ndarray:
        n = len(self._jobs)
        return (self._b[:n] + now + self._t[:n]) / self._t[:n]

    def score_of(self, job: Job, now: float) -> float:
        i = self._row[job.job_id]
        return float((self._b[i] + now + self._t[i]) / self._t[i])

    def ranked(self, now: float, room: list[int] | None = None) -> Iterator[Job]:
        """Jobs by descending response ratio, lazily: a build usually takes only the first
        few. `room` is a one-element list holding the most blocks any worker can still give;
        the builder lowers it as it admits, and jobs needing more are skipped, vectorised.
        The order is fixed when iteration starts, so the caller may remove jobs meanwhile."""
        n = len(self._jobs)
        if n == 0:
            return iter(())
        room = room if room is not None else [np.iinfo(np.int64).max]
        keys = -self.scores(now)
        need = self._need[:n].copy()
        return self._in_order(list(self._jobs), keys, need, room)

    @staticmethod
    def _in_order(jobs: list[Job], keys: np.ndarray, need: np.ndarray,
                  room: list[int]) -> Iterator[Job]:
        bound = room[0]
        idx = np.flatnonzero(need <= bound)
        if len(idx) > TOP_K:  # sort the best TOP_K first, the rest only if asked
            head = idx[np.argpartition(keys[idx], TOP_K)[:TOP_K]]
            head = head[np.argsort(keys[head], kind="stable")]
            for i in head.tolist():
                if need[i] <= room[0]:
                    yield jobs[i]
            keys[head] = np.inf  # taken
            idx = np.flatnonzero((need <= room[0]) & (keys < np.inf))
        order = idx[np.argsort(keys[idx], kind="stable")]
        bound, pos = room[0], 0
        while pos < len(order):
            if room[0] < bound:  # less room now: drop, at once, whoever cannot fit anymore
                bound = room[0]
                order = order[pos:][need[order[pos:]] <= bound]
                pos = 0
                continue
            i = int(order[pos])
            pos += 1
            yield jobs[i]

    def over_ratio(self, now: float, ratio: float) -> list[Job]:
        """Jobs whose response ratio exceeds `ratio` (for aging)."""
        n = len(self._jobs)
        if n == 0:
            return []
        return [self._jobs[i] for i in np.flatnonzero(self.scores(now) > ratio).tolist()]
