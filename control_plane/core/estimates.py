"""What the scheduler needs predicted, as an interface.

The policies ask three things: how many tokens the current segment will generate, how long a
job's API wait will last (in total, and what remains of it), and — for Continuum — the
distribution of a tool category's durations. `OnlineJobEstimator` learns them from
observations (through the category-keyed `astraea.estimators.OnlineEstimator`); the simulator
also offers a labelled trace oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from astraea.estimators import OnlineEstimator
from astraea.plan import JobState
from control_plane.core.job import Job

PEAKS_LOOKED_AT = 256  # samples of a window `remaining_api_until` passes before it stops


class ServiceTimeEstimator(Protocol):
    name: str

    def output_tokens(self, job: Job) -> float:
        """Predicted tokens the job's current (ready or running) segment generates."""

    def api_duration_s(self, job: Job) -> float:
        """Predicted total duration of the API wait the job is in (or about to enter)."""

    def remaining_api_s(self, job: Job, now: float) -> float:
        """Predicted time until the job's API returns, given it started at job.api_start_s."""

    def api_duration_samples(self, category: str) -> Sequence[float]:
        """Recent observed durations of a tool category (sorted), for CDF-based policies."""

    def observe_output(self, job: Job, tokens: int) -> None: ...

    def observe_api(self, category: str, duration_s: float) -> None: ...


class OnlineJobEstimator(OnlineEstimator):
    """`ServiceTimeEstimator` over the category-keyed online estimator: a job's questions
    become its tool category, its category and its segment index."""

    def api_duration_s(self, job: Job) -> float:
        return self.api_mean_s(job.next_tool_category)

    def remaining_api_s(self, job: Job, now: float) -> float:
        if job.state is not JobState.API_WAIT:
            return 0.0
        return self.api_remaining_s(job.next_tool_category, now - job.api_start_s)

    def remaining_api_until(self, job: Job, now: float, until: float,
                            exceeds: Callable[[float], bool]) -> float:
        """The first instant T in [now, until] from which `remaining_api_s(job, τ)` may make
        `exceeds` true (a test that, once true, is true for every larger value): at every
        instant in [now, T) it is false. `until` if at none; `now` if it may be already."""
        if job.state is not JobState.API_WAIT:
            return now if exceeds(0.0) else until
        start = job.api_start_s
        window = self._api_window(job.next_tool_category)
        if window is None:  # the prior only counts down
            return now if exceeds(self.api_remaining_s(job.next_tool_category, now - start)) else until
        for i, (elapsed, remaining) in enumerate(window.remaining_peaks(now - start, until - start)):
            if exceeds(remaining):
                return now if i == 0 else _first_instant(start, elapsed)
            if i == PEAKS_LOOKED_AT:  # far enough: look no further than this peak
                return min(until, _first_instant(start, elapsed))
        return until

    def output_tokens(self, job: Job) -> float:
        return self.output_tokens_for(job.category, job.segment_index)

    def observe_output(self, job: Job, tokens: int) -> None:
        # Called before the job's segment index advances, so the key names this segment.
        self.observe_output_for(job.category, job.segment_index, tokens)


class HintedEstimator:
    """A `ServiceTimeEstimator` that answers from the job's own hints where its client gave
    them (`Job.hinted_output_tokens`, `Job.hinted_api_s`) and asks `inner` otherwise. The
    observations still go to `inner`, so it keeps learning for the jobs that give none."""

    def __init__(self, inner: ServiceTimeEstimator) -> None:
        self.inner = inner
        self.name = f"hinted-{inner.name}"

    def output_tokens(self, job: Job) -> float:
        if job.hinted_output_tokens is not None:
            return float(job.hinted_output_tokens)
        return self.inner.output_tokens(job)

    def api_duration_s(self, job: Job) -> float:
        if job.hinted_api_s is not None:
            return job.hinted_api_s
        return self.inner.api_duration_s(job)

    def remaining_api_s(self, job: Job, now: float) -> float:
        if job.hinted_api_s is None:
            return self.inner.remaining_api_s(job, now)
        if job.state is not JobState.API_WAIT:
            return 0.0
        # A hint is a point estimate: once it has passed, the wait is about to end.
        return max(job.hinted_api_s - (now - job.api_start_s), 0.0)

    def api_duration_samples(self, category: str) -> Sequence[float]:
        return self.inner.api_duration_samples(category)

    def observe_output(self, job: Job, tokens: int) -> None:
        self.inner.observe_output(job, tokens)

    def observe_api(self, category: str, duration_s: float) -> None:
        self.inner.observe_api(category, duration_s)

    def __getattr__(self, name: str):  # the inner estimator's extras (e.g. a link's state)
        return getattr(self.inner, name)


def _first_instant(start: float, elapsed: float) -> float:
    """An instant T such that every τ < T has τ − start < elapsed, as floats subtract."""
    t = start + elapsed
    while t - start >= elapsed:
        t = math.nextafter(t, -math.inf)
    return t
