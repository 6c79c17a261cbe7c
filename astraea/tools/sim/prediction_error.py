"""Wrong predictions on purpose: an estimator wrapper that multiplies every estimate a policy
receives by a log-normal factor, for `astraea bench --prediction-error SIGMA`.

How the error applies (factor = exp(σ·z), z standard normal, so the median factor is 1):
- output length: one factor per (job, segment); every query about that segment gets it.
- API duration: one factor per (job, API call) — the call after segment k is call k. The
  distorted predictor believes this call's duration distribution is the undistorted one
  scaled by the factor f, so `api_duration_s` is f × the estimate and `remaining_api_s`
  after e seconds of waiting is f × (the undistorted remaining after e / f seconds). For the
  oracle that is max(f·d − e, 0): a wrong guess of the duration, counted down honestly.
- duration samples (Continuum's CDF): the category's samples are not tied to one call, so
  each sample gets its own factor, keyed by (category, the sample's value to the µs); the
  list is re-sorted. The learned distribution is widened, not shifted.
- observations pass through unchanged: the predictor still learns from the truth.

z comes from a hash of (seed, kind, job or category, index), not from a stream, so every
policy sees the same error on the same call whatever order it asks in, and a larger σ scales
the same z (the matrix's σ values differ only in magnitude).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from statistics import NormalDist

from astraea.plan import JobState
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.job import Job

_NORMAL = NormalDist()


def standard_normal(seed: int, *key: object) -> float:
    """A deterministic N(0, 1) draw for `key` under `seed` (same in every process)."""
    text = "\x1f".join(str(k) for k in (seed, *key)).encode()
    bits = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
    return _NORMAL.inv_cdf((bits + 0.5) / 2.0**64)


class PredictionErrorEstimator:
    """A `ServiceTimeEstimator` that distorts `inner`'s estimates by factors exp(σ·z)."""

    def __init__(self, inner: ServiceTimeEstimator, sigma: float, seed: int = 0) -> None:
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"prediction error sigma must be a finite number >= 0, got {sigma}")
        self.inner = inner
        self.sigma = sigma
        self.seed = seed
        self.name = inner.name
        self.factors: dict[tuple, float] = {}  # every factor drawn so far, by its key

    def factor(self, *key: object) -> float:
        f = self.factors.get(key)
        if f is None:
            f = math.exp(self.sigma * standard_normal(self.seed, *key))
            self.factors[key] = f
        return f

    def _api_factor(self, job: Job) -> float:
        # In API_WAIT the segment index has already moved past the segment that called.
        call = job.segment_index - 1 if job.state is JobState.API_WAIT else job.segment_index
        return self.factor("api", job.job_id, call)

    def output_tokens(self, job: Job) -> float:
        return self.inner.output_tokens(job) * self.factor("out", job.job_id, job.segment_index)

    def api_duration_s(self, job: Job) -> float:
        return self.inner.api_duration_s(job) * self._api_factor(job)

    def remaining_api_s(self, job: Job, now: float) -> float:
        f = self._api_factor(job)
        elapsed = now - job.api_start_s
        return f * self.inner.remaining_api_s(job, job.api_start_s + elapsed / f)

    def api_duration_samples(self, category: str) -> Sequence[float]:
        samples = self.inner.api_duration_samples(category)
        return sorted(s * self.factor("sample", category, round(s, 6)) for s in samples)

    def observe_output(self, job: Job, tokens: int) -> None:
        self.inner.observe_output(job, tokens)

    def observe_api(self, category: str, duration_s: float) -> None:
        self.inner.observe_api(category, duration_s)
