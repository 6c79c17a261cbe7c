"""In-memory load statistics of one control plane: event counts and plan latencies.

Cheap enough to be always on (a counter increment per event, two clock reads and two appends
per plan). `astraea bench-service` reads them; nothing else depends on them.

* `events[kind]`: what reached the control plane, one per RunSegment submitted
  (``run_segment``), ReportToolCall (``tool_call``), StartJob/EndJob (``start_job``,
  ``end_job``), and per WorkerMessage received on a worker stream, under its oneof name
  (``tokens``, ``segment_ended``, ``memory``, ``step_report``, ``preempted``,
  ``admit_refused``, ``heartbeat``); a Bundle counts as the messages it carries.
* `bundles`: the Bundle messages those arrived in (fewer gRPC messages than reports).
* `plan_latency_s`: for each plan caused by an event, from the first `mark_dirty` after the
  previous plan to the moment the plan's messages were queued on the worker streams
  (`Planner.plan_once` has returned). It includes the wait for the event loop to reach the
  planner: under load that wait is most of it.
* `build_s`: the wall time of `Scheduler.build_plan` alone, for the same plans.

Samples are kept in bounded ring buffers of doubles (the newest `MAX_SAMPLES`), which the
cyclic garbage collector never scans.
"""

from __future__ import annotations

import math
import resource
import time
from array import array
from collections import Counter

MAX_SAMPLES = 1 << 18


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q`-th percentile (0–100) of an ascending list, nearest rank; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(samples_s) -> dict:
    """count, mean, p50, p90, p99, p99.9 and max of samples in seconds, as milliseconds."""
    values = sorted(samples_s)
    out = {"count": len(values),
           "mean_ms": 1e3 * sum(values) / len(values) if values else math.nan}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        out[f"{name}_ms"] = 1e3 * percentile(values, q)
    out["max_ms"] = 1e3 * values[-1] if values else math.nan
    return out


class Samples:
    """The newest `capacity` floats appended (a ring buffer over an array of doubles)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._buf = array("d", bytes(8 * capacity))
        self._n = 0  # appended since the last clear

    def append(self, value: float) -> None:
        self._buf[self._n % len(self._buf)] = value
        self._n += 1

    def clear(self) -> None:
        self._n = 0

    def __len__(self) -> int:
        return min(self._n, len(self._buf))

    def __iter__(self):
        return iter(self._buf[:len(self)])


class ServiceStats:
    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        self.events: Counter[str] = Counter()
        self.bundles = 0
        self.plan_latency_s = Samples(max_samples)
        self.build_s = Samples(max_samples)
        self.plans = 0  # plans caused by events, since the last reset
        self.plans_with_actions = 0
        self._since = time.monotonic()
        self._cpu0 = self._cpu()

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return r.ru_utime + r.ru_stime

    def record_plan(self, latency_s: float, build_s: float, actions: int) -> None:
        self.plan_latency_s.append(latency_s)
        self.build_s.append(build_s)
        self.plans += 1
        if actions:
            self.plans_with_actions += 1

    def reset(self) -> None:
        """Start a new measurement window."""
        self.events.clear()
        self.bundles = 0
        self.plan_latency_s.clear()
        self.build_s.clear()
        self.plans = self.plans_with_actions = 0
        self._since = time.monotonic()
        self._cpu0 = self._cpu()

    def snapshot(self) -> dict:
        """Everything since the last reset, JSON-ready."""
        elapsed = time.monotonic() - self._since
        cpu = self._cpu() - self._cpu0
        return {"elapsed_s": elapsed, "cpu_s": cpu,
                "cpu_percent": 100 * cpu / elapsed if elapsed > 0 else math.nan,
                "events": dict(self.events), "bundles": self.bundles, "plans": self.plans,
                "plans_with_actions": self.plans_with_actions,
                "plan_latency": summarize_ms(self.plan_latency_s),
                "build_plan": summarize_ms(self.build_s)}
