"""The trace oracle: true output lengths and API durations, read from the trace.

Simulator-only and labelled as such (`--predictor oracle`): a real deployment cannot know the
future. Observations still feed an online estimator, whose samples Continuum's CDF uses.
"""

from __future__ import annotations

from astraea.plan import JobState
from astraea.workloads.trace import JobTrace
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job


class TraceOracle:
    name = "oracle"

    def __init__(self, jobs: dict[str, JobTrace]) -> None:
        self._jobs = jobs
        self._learned = OnlineJobEstimator()

    def output_tokens(self, job: Job) -> float:
        segs = self._jobs[job.job_id].segments
        return float(segs[min(job.segment_index, len(segs) - 1)].output_tokens)

    def api_duration_s(self, job: Job) -> float:
        segs = self._jobs[job.job_id].segments
        i = job.segment_index - 1 if job.state is JobState.API_WAIT else job.segment_index
        tool = segs[max(i, 0)].tool
        return tool.duration_s if tool else 0.0

    def remaining_api_s(self, job: Job, now: float) -> float:
        if job.state is not JobState.API_WAIT:
            return 0.0
        return max(self.api_duration_s(job) - (now - job.api_start_s), 0.0)

    def remaining_api_until(self, job: Job, now: float, until: float, exceeds) -> float:
        """See `OnlineJobEstimator.remaining_api_until`: the true wait only counts down."""
        return now if exceeds(self.remaining_api_s(job, now)) else until

    def api_duration_samples(self, category: str):
        return self._learned.api_duration_samples(category)

    def observe_output(self, job: Job, tokens: int) -> None:
        self._learned.observe_output(job, tokens)

    def observe_api(self, category: str, duration_s: float) -> None:
        self._learned.observe_api(category, duration_s)
