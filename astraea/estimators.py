"""Online service-time estimators (pure: no I/O, no clock of their own), keyed by category.

The predictor service serves them over the wire; the control plane keeps one in process as
its fallback (`control_plane.core.estimates.OnlineJobEstimator` asks it about `Job`s).

* API latency per tool category: a sliding window of recent durations gives the mean, the
  quantiles and — what heavy tails need — the expected *remaining* time given the time already
  waited (E[T − e | T > e]), which a plain mean gets wrong once a long call has run a while.
  An unseen category borrows the pooled window of all categories; with no data at all, a prior.
* Output tokens per segment: running means per (category, first segment or later), falling
  back to the category, then to all jobs, then to a prior.
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

PRIOR_API_S = 1.0
PRIOR_OUTPUT_TOKENS = 64.0


@dataclass
class DurationWindow:
    """The last `size` observations of one quantity, kept sorted for quantile queries."""

    size: int = 512
    _fifo: deque = field(default_factory=deque)
    _sorted: list = field(default_factory=list)
    _sum: float = 0.0
    count: int = 0  # all observations ever
    _peaks: dict = field(default_factory=dict, repr=False, compare=False)  # see remaining_peaks

    def add(self, x: float) -> None:
        self._peaks.clear()
        self.count += 1
        self._fifo.append(x)
        bisect.insort(self._sorted, x)
        self._sum += x
        if len(self._fifo) > self.size:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._sum -= old

    def __len__(self) -> int:
        return len(self._fifo)

    @property
    def mean(self) -> float:
        return self._sum / len(self._fifo)

    def quantile(self, q: float) -> float:
        s = self._sorted
        return s[min(len(s) - 1, max(0, int(q * len(s))))]

    def expected_remaining(self, elapsed: float) -> float:
        """E[T − elapsed | T > elapsed] over the window; if every sample is shorter, the
        window's mean residual is unknown, so assume the call ends about now."""
        s = self._sorted
        i = bisect.bisect_right(s, elapsed)
        longer = len(s) - i
        if longer == 0:
            return 0.0
        tail_sum = sum(s[i:]) if longer < 64 else self._sum - sum(s[:i])
        return tail_sum / longer - elapsed

    def remaining_peaks(self, start: float, end: float) -> Iterator[tuple[float, float]]:
        """Where `expected_remaining` may peak over elapsed times in [start, end], in order:
        (elapsed, value) at `start` and at each distinct sample in (start, end]. Between two
        samples the tail is fixed and the value only falls, so on [e, next e) the value at e
        is the largest. The values at samples are kept until the window changes."""
        yield start, self.expected_remaining(start)
        s, known = self._sorted, self._peaks
        i = bisect.bisect_right(s, start)
        while i < len(s) and s[i] <= end:
            e = s[i]
            value = known.get(e)
            if value is None:
                value = known[e] = self.expected_remaining(e)
            yield e, value
            i = bisect.bisect_right(s, e, i)

    @property
    def sorted_samples(self) -> list[float]:
        return self._sorted

    def export_state(self) -> dict:
        return {"samples": list(self._fifo), "sum": self._sum, "count": self.count}

    @classmethod
    def from_state(cls, data: dict, size: int) -> DurationWindow:
        w = cls(size)
        samples = [float(x) for x in data["samples"]]
        w._fifo = deque(samples)
        w._sorted = sorted(samples)
        w._sum = float(data["sum"])
        w.count = int(data["count"])
        return w


class OnlineEstimator:
    """Learns API latencies and output lengths from what the control plane observes."""

    name = "online"

    def __init__(self, window: int = 512, prior_api_s: float = PRIOR_API_S,
                 prior_output_tokens: float = PRIOR_OUTPUT_TOKENS) -> None:
        self._window = window
        self.prior_api_s = prior_api_s
        self.prior_output_tokens = prior_output_tokens
        self._api: dict[str, DurationWindow] = {}
        self._api_all = DurationWindow(window)
        self._out_sum: dict[tuple, float] = defaultdict(float)
        self._out_n: dict[tuple, int] = defaultdict(int)

    # --- API latency ------------------------------------------------------------------
    def _api_window(self, category: str | None) -> DurationWindow | None:
        w = self._api.get(category or "")
        if w is not None and len(w) >= 8:
            return w
        return self._api_all if len(self._api_all) else None

    def api_mean_s(self, category: str | None) -> float:
        w = self._api_window(category)
        return w.mean if w else self.prior_api_s

    def api_remaining_s(self, category: str | None, elapsed: float) -> float:
        w = self._api_window(category)
        if w is None:
            return max(self.prior_api_s - elapsed, 0.0)
        return w.expected_remaining(elapsed)

    def api_is_learned(self, category: str | None) -> bool:
        """True when API estimates for `category` come from observations, not the prior."""
        return self._api_window(category) is not None

    def api_duration_samples(self, category: str) -> list[float]:
        w = self._api_window(category)
        return w.sorted_samples if w else []

    def api_quantile(self, category: str, q: float) -> float:
        w = self._api_window(category)
        return w.quantile(q) if w else self.prior_api_s

    def observe_api(self, category: str, duration_s: float) -> None:
        if duration_s < 0:
            raise ValueError(f"negative API duration {duration_s}")
        w = self._api.get(category)
        if w is None:
            w = self._api[category] = DurationWindow(self._window)
        w.add(duration_s)
        self._api_all.add(duration_s)

    # --- output length ----------------------------------------------------------------
    @staticmethod
    def _output_keys(category: str, segment_index: int) -> tuple[tuple, ...]:
        first = segment_index == 0
        return ((category, first), (category,), ())

    def _learned_output_key(self, category: str, segment_index: int) -> tuple | None:
        for key in self._output_keys(category, segment_index):
            if self._out_n.get(key, 0) >= 4:
                return key
        return None

    def output_tokens_for(self, category: str, segment_index: int) -> float:
        key = self._learned_output_key(category, segment_index)
        if key is None:
            return self.prior_output_tokens
        return self._out_sum[key] / self._out_n[key]

    def output_is_learned(self, category: str, segment_index: int) -> bool:
        return self._learned_output_key(category, segment_index) is not None

    def observe_output_for(self, category: str, segment_index: int, tokens: int) -> None:
        for key in self._output_keys(category, segment_index):
            self._out_sum[key] += tokens
            self._out_n[key] += 1

    def observations(self) -> tuple[int, int]:
        """(API durations, segment output lengths) learned from, ever (with a loaded state,
        its own too)."""
        return self._api_all.count, self._out_n.get((), 0)

    # --- state export / import (the predictor service persists these) -------------------
    def export_state(self) -> dict:
        """Everything learned, as plain JSON-able data. Window sums are kept as they are
        (not recomputed) so a reloaded estimator answers bit-for-bit the same."""
        return {
            "window": self._window,
            "prior_api_s": self.prior_api_s,
            "prior_output_tokens": self.prior_output_tokens,
            "api": {cat: w.export_state() for cat, w in sorted(self._api.items())},
            "api_all": self._api_all.export_state(),
            "outputs": [
                {"key": list(key), "sum": self._out_sum[key], "n": self._out_n[key]}
                for key in sorted(self._out_n, key=repr)
            ],
        }

    @classmethod
    def from_state(cls, data: dict) -> OnlineEstimator:
        """The inverse of `export_state`; `data` is trusted to be well-formed
        (the predictor service validates files before calling this)."""
        est = cls(window=int(data["window"]), prior_api_s=float(data["prior_api_s"]),
                  prior_output_tokens=float(data["prior_output_tokens"]))
        est._api = {cat: DurationWindow.from_state(w, est._window)
                    for cat, w in data["api"].items()}
        est._api_all = DurationWindow.from_state(data["api_all"], est._window)
        for entry in data["outputs"]:
            key = tuple(entry["key"])
            est._out_sum[key] = float(entry["sum"])
            est._out_n[key] = int(entry["n"])
        return est
