"""The instruments every service shares (docs/design.md, Telemetry conventions).

| instrument | kind | unit | attributes |
|---|---|---|---|
| `astraea.queue.length` | observable gauge (callback) | {job} | `level` (MLFQ level, 0 = top) |
| `astraea.kv.utilization` | observable gauge (callback) | 1 | `worker_id` |
| `astraea.job.jct` | histogram | s | `policy`, `category` |
| `astraea.decision.latency` | histogram | ms | `kind`: `build_plan` or `kv_decision` |
| `astraea.predictor.fallbacks` | counter | {call} | `reason` (e.g. `timeout`, `unavailable`) |
| `astraea.jobs.in_flight` | observable gauge (callback) | {job} | none |
| `astraea.kv.decisions` | observable counter (callback) | {decision} | `action` (`preserve`, `swap`, `discard`), `cause` (`api_wait`, `preemption`) |

The callbacks read whatever source the owning service registers (`set_queue_length_source`,
`set_kv_utilization_source`, `set_jobs_in_flight_source`, `set_kv_decision_source`); until
then they report nothing.
`export_prometheus` also records every instrument into a Prometheus registry (prometheus.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from astraea.plan import decision_labels

DECISION_KINDS = ("build_plan", "kv_decision")
# Bucket bounds for the scale of each quantity: default OTel buckets (0, 5, 10, 25 … 10000)
# would put every sub-millisecond decision in one bucket.
JCT_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
DECISION_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000)

QueueLengthSource = Callable[[], Mapping[int, int]]
KvUtilizationSource = Callable[[], Mapping[int | str, float]]
CountSource = Callable[[], int]
# {"preserve": n, "swap": n, "reclaim_swap": n, "preempt_discard": n, ...}: the scheduler's own
# counts (`Scheduler.decision_counts`, keys: astraea.plan.decision_key), read at collection:
# counting twice could drift from them.
DecisionCountSource = Callable[[], Mapping[str, int]]


class Metrics:
    """The shared instruments, created from one meter."""

    def __init__(self, meter: Meter) -> None:
        self._queue_source: QueueLengthSource | None = None
        self._kv_source: KvUtilizationSource | None = None
        self._jobs_in_flight_source: CountSource | None = None
        self._decision_source: DecisionCountSource | None = None
        self._step_ratio_source: KvUtilizationSource | None = None
        self._prom = None  # SchedulerFamilies, once export_prometheus is called
        self.jct = meter.create_histogram(
            "astraea.job.jct", unit="s", description="Job completion time, arrival to finish",
            explicit_bucket_boundaries_advisory=list(JCT_BUCKETS_S))
        self.decision_latency = meter.create_histogram(
            "astraea.decision.latency", unit="ms",
            description="Wall time of a scheduling decision (build_plan or kv_decision)",
            explicit_bucket_boundaries_advisory=list(DECISION_BUCKETS_MS))
        self.predictor_fallbacks = meter.create_counter(
            "astraea.predictor.fallbacks", unit="{call}",
            description="Predictor calls answered by local estimates (slow or down predictor)")
        self.queue_length = meter.create_observable_gauge(
            "astraea.queue.length", callbacks=[self._observe_queues], unit="{job}",
            description="Ready jobs per MLFQ level")
        self.kv_utilization = meter.create_observable_gauge(
            "astraea.kv.utilization", callbacks=[self._observe_kv], unit="1",
            description="Fraction of a worker's GPU KV blocks in use")
        self.jobs_in_flight = meter.create_observable_gauge(
            "astraea.jobs.in_flight", callbacks=[self._observe_jobs], unit="{job}",
            description="Jobs started and not finished")
        self.step_time_ratio = meter.create_observable_gauge(
            "astraea.engine.step_time_ratio", callbacks=[self._observe_step_ratio], unit="1",
            description="A worker's engine step times over what the cost model prices the same "
                        "steps at, over its recent steps (1: the profile is calibrated)")
        self.kv_decisions = meter.create_observable_counter(
            "astraea.kv.decisions", callbacks=[self._observe_decisions], unit="{decision}",
            description="KV decisions made: at API waits (tool calls, reclaims) and preemptions")

    def export_prometheus(self, registry) -> None:
        """Also record into `registry` (a prometheus_client `CollectorRegistry`), under the
        names prometheus.py lists; the gauges read the same sources."""
        from astraea.telemetry.prometheus import SchedulerFamilies

        if self._prom is not None:
            raise RuntimeError("these metrics are exported to a Prometheus registry already")
        self._prom = SchedulerFamilies(registry, self)

    # -- sources for the observable gauges ---------------------------------------------------

    def set_queue_length_source(self, source: QueueLengthSource | None) -> None:
        """`source()` returns {MLFQ level: ready jobs}; called at each metric collection."""
        self._queue_source = source

    def set_kv_utilization_source(self, source: KvUtilizationSource | None) -> None:
        """`source()` returns {worker id: utilisation in [0, 1]}; called at each collection."""
        self._kv_source = source

    def set_jobs_in_flight_source(self, source: CountSource | None) -> None:
        """`source()` returns the number of jobs started and not finished."""
        self._jobs_in_flight_source = source

    def set_kv_decision_source(self, source: DecisionCountSource | None) -> None:
        """`source()` returns the scheduler's decision counts (`decision_labels` reads the
        keys); called at each collection."""
        self._decision_source = source

    def set_step_time_ratio_source(self, source: KvUtilizationSource | None) -> None:
        """`source()` returns {worker id: measured / predicted step time}; called at each
        collection."""
        self._step_ratio_source = source

    def _observe_step_ratio(self, _options: CallbackOptions) -> list[Observation]:
        if self._step_ratio_source is None:
            return []
        return [Observation(float(r), {"worker_id": str(w)})
                for w, r in self._step_ratio_source().items()]

    def _observe_decisions(self, _options: CallbackOptions) -> list[Observation]:
        if self._decision_source is None:
            return []
        out = []
        for key, n in dict(self._decision_source()).items():
            action, cause = decision_labels(key)
            out.append(Observation(int(n), {"action": action, "cause": cause}))
        return out

    def _observe_jobs(self, _options: CallbackOptions) -> list[Observation]:
        if self._jobs_in_flight_source is None:
            return []
        return [Observation(int(self._jobs_in_flight_source()))]

    def _observe_queues(self, _options: CallbackOptions) -> list[Observation]:
        if self._queue_source is None:
            return []
        return [Observation(int(n), {"level": int(level)})
                for level, n in self._queue_source().items()]

    def _observe_kv(self, _options: CallbackOptions) -> list[Observation]:
        if self._kv_source is None:
            return []
        return [Observation(float(u), {"worker_id": str(w)})
                for w, u in self._kv_source().items()]

    # -- recording ---------------------------------------------------------------------------

    def record_jct(self, seconds: float, *, policy: str, category: str) -> None:
        self.jct.record(seconds, {"policy": policy, "category": category})
        if self._prom is not None:
            self._prom.jct.labels(policy, category).observe(seconds)

    def record_decision_latency(self, ms: float, *, kind: str) -> None:
        if kind not in DECISION_KINDS:
            raise ValueError(f"decision kind {kind!r}: must be one of {DECISION_KINDS}")
        self.decision_latency.record(ms, {"kind": kind})
        if self._prom is not None:
            self._prom.decision_latency.labels(kind).observe(ms / 1000)

    @contextmanager
    def time_decision(self, kind: str) -> Iterator[None]:
        """Record the wall time of the enclosed block as a decision latency of `kind`."""
        if kind not in DECISION_KINDS:
            raise ValueError(f"decision kind {kind!r}: must be one of {DECISION_KINDS}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record_decision_latency(1000 * (time.perf_counter() - t0), kind=kind)

    def predictor_fallback(self, reason: str = "unavailable", n: int = 1) -> None:
        self.predictor_fallbacks.add(n, {"reason": reason})
        if self._prom is not None:
            self._prom.predictor_fallbacks.labels(reason).inc(n)
