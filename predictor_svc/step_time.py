"""Online fit of the engine's step time from the timings workers report.

Model, in milliseconds, the linear form of `astraea.profile.HardwareProfile`::

    step_ms = c + a · tokens + k · context_tokens_read

fitted by least squares over a sliding window of recent `StepTiming` samples. Until a fit
succeeds the model answers from the hardware profile it was seeded with (its exact formulas,
including a piecewise table), so the scheduler has estimates before any worker has run a step.
A fit is refused — and the previous coefficients kept — when the window cannot identify all
three coefficients: too few samples, no variation in tokens or context (rank < 3), or a result
that is not physical (a negative or non-finite coefficient, e.g. from noisy near-collinear data).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from astraea.plan import StepTiming
from astraea.profile import HardwareProfile

DEFAULT_WINDOW = 2048
MIN_SAMPLES = 8


@dataclass(frozen=True)
class StepCoefficients:
    c_ms: float
    a_ms_per_token: float
    k_ms_per_context_token: float


class StepTimeModel:
    """Step time learned from observations, seeded from a `HardwareProfile`."""

    def __init__(self, profile: HardwareProfile, window: int = DEFAULT_WINDOW,
                 min_samples: int = MIN_SAMPLES) -> None:
        if window < 3 or min_samples < 3:
            raise ValueError("window and min_samples must be at least 3 (three coefficients)")
        self.profile = profile
        self.window = window
        self.min_samples = min_samples
        self._timings: deque[StepTiming] = deque(maxlen=window)
        self._fit: StepCoefficients | None = None  # None → answer from the profile
        self._dirty = False  # refit lazily: observations arrive far more often than queries

    # --- learning ---------------------------------------------------------------------
    def observe(self, tokens: int, context_tokens_read: int, duration_s: float) -> None:
        if tokens < 0 or context_tokens_read < 0:
            raise ValueError("tokens and context_tokens_read must not be negative")
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"step duration_s must be finite and >= 0, got {duration_s}")
        self._timings.append(StepTiming(int(tokens), int(context_tokens_read), float(duration_s)))
        self._dirty = True

    @property
    def timings(self) -> list[StepTiming]:
        """The window of step timings the fit uses, oldest first."""
        return list(self._timings)

    def replace_timings(self, timings: list[StepTiming]) -> None:
        """Start over from `timings` (a loaded state); the fit is redone from them, and
        falls back to the profile seed if they cannot support one."""
        self._timings = deque(timings, maxlen=self.window)
        self._fit = None
        self._dirty = True

    def _refit(self) -> None:
        self._dirty = False
        n = len(self._timings)
        if n < self.min_samples:
            return
        x = np.array([(1.0, s.tokens, s.context_tokens_read) for s in self._timings])
        y = np.array([s.duration_s * 1e3 for s in self._timings])
        # Scale columns to unit max so the rank test and the solve are not dominated by the
        # context column, which is orders of magnitude larger than the others.
        scale = np.abs(x).max(axis=0)
        if np.any(scale == 0):
            return  # a column of zeros: that coefficient is unidentifiable
        xs = x / scale
        if np.linalg.matrix_rank(xs, tol=1e-9 * n) < 3:
            return
        beta, *_ = np.linalg.lstsq(xs, y, rcond=None)
        c, a, k = (float(v) for v in beta / scale)
        if not all(math.isfinite(v) for v in (c, a, k)):
            return
        # Round-off on an exact fit can leave a true zero slightly negative; clamp that,
        # but refuse clearly non-physical fits (keep the previous coefficients instead).
        tol = 1e-9 * max(1.0, float(np.abs(y).max()))
        if min(c, a * scale[1], k * scale[2]) < -tol:
            return
        self._fit = StepCoefficients(max(c, 0.0), max(a, 0.0), max(k, 0.0))

    @property
    def fitted(self) -> StepCoefficients | None:
        """The learned coefficients, or None while the profile seed is in use."""
        if self._dirty:
            self._refit()
        return self._fit

    @property
    def is_learned(self) -> bool:
        return self.fitted is not None

    @property
    def coefficients(self) -> StepCoefficients:
        """The coefficients in use; for the seed, the profile's linear terms (a table
        profile's non-attention time is not linear: the queries below use its table)."""
        fit = self.fitted
        if fit is not None:
            return fit
        p = self.profile
        return StepCoefficients(p.c_ms, p.a_ms_per_token, p.k_ms_per_context_token)

    # --- queries (the same formulas as HardwareProfile) -------------------------------
    def _non_attention_ms(self, tokens: int) -> float:
        fit = self.fitted
        if fit is None:
            return self.profile.non_attention_ms(tokens)
        return fit.c_ms + fit.a_ms_per_token * tokens

    def _k_ms(self) -> float:
        fit = self.fitted
        return self.profile.k_ms_per_context_token if fit is None else fit.k_ms_per_context_token

    def step_time_s(self, tokens: int, context_tokens_read: int) -> float:
        return (self._non_attention_ms(tokens) + self._k_ms() * context_tokens_read) / 1e3

    def prefill_time_s(self, tokens: int, prior_context: int = 0) -> float:
        """Time to prefill `tokens` alone, in chunks of the profile's step token budget;
        each chunk reads the `prior_context` (HardwareProfile.prefill_time_s)."""
        if tokens <= 0:
            return 0.0
        budget = self.profile.max_num_batched_tokens
        full, rest = divmod(tokens, budget)
        t = full * self._non_attention_ms(budget) + (self._non_attention_ms(rest) if rest else 0.0)
        t += self._k_ms() * prior_context * (full + (1 if rest else 0))
        return t / 1e3

    def decode_step_s(self, context: int) -> float:
        """One decode step of a sequence alone with `context` tokens of KV."""
        return self.step_time_s(1, context)
