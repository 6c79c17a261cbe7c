"""What the scheduler needs predicted, as an interface.

The policies ask three things: how many tokens the current segment will generate, how long a
job's API wait will last (in total, and what remains of it), and — for Continuum — the
distribution of a tool category's durations. `predictor_svc.estimators.OnlineEstimator` learns
them from observations; the simulator also offers a labelled trace oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from control_plane.core.job import Job


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
