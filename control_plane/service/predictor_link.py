"""The control plane's link to the remote predictor service, with a local fallback.

The `Scheduler` calls its estimator synchronously on the event loop, so `PredictorLink` never
touches the network from those calls: every query is answered from memory, either from a local
`OnlineJobEstimator` (fed with every observation, always available) or from the per-category
estimates last fetched from the remote `PredictorService` while it was reachable.

A background task (`start` / `close`) does all the I/O, each call bounded by `timeout_s`:

* observations — API durations and output lengths (from the scheduler), engine step timings
  (the workers' StepReports, via `observe_steps`) — are queued and sent in `Observe` batches
  every `flush_interval_s`;
* every `refresh_interval_s`, one `Estimate` call fetches, for each category seen, the remote
  API mean (as a tool category) and output length (as a job category, first segment and
  later ones); answers whose source is the prior are ignored.

What is served where: `api_duration_s` and `output_tokens` prefer the remote estimate while the
predictor is reachable, the estimate is fresh, and the predictor has learned from more
observations than the local estimator has seen (a state it saved before, other control planes);
otherwise the local estimator knows everything the predictor does, and sooner (the predictor
hears of each observation up to `flush_interval_s` later and is asked every
`refresh_interval_s`: at 5x real time, seconds of engine time), so it answers. `remaining_api_s` (a tail-aware conditional
that depends on the time already waited) and `api_duration_samples` always come from the local
window, which sees the same observations.

When a call times out or fails the predictor counts as down: the remote estimates are not used,
one warning is logged for the outage (and one info line when it answers again), and each
failed call adds one to `astraea.predictor.fallbacks` with ``reason`` ``timeout`` or
``unavailable`` (``error`` for other failures). While down, the link retries every
`retry_interval_s`. Observations not delivered because the predictor was unreachable are kept
(up to `max_pending`, oldest dropped first) and sent after recovery; a batch whose call timed
out is not resent, since the predictor may have learned it already.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable

import grpc
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Tracer

from astraea.auth import ClientCredentials
from astraea.telemetry import Metrics, get_logger, inject_metadata
from astraea.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job

log = get_logger("astraea.control_plane.predictor")

DEFAULT_TIMEOUT_S = 0.2
MAX_BATCH = 1000  # observations per Observe call (the predictor accepts up to 10,000)
MAX_FORWARDED_API_S = 3600.0  # the predictor's default max_api_duration_s
MAX_CATEGORIES = 1000  # categories refreshed per Estimate call (two requests each)
UNKNOWN_CATEGORY = "unknown"
# Links per Observe span to the spans whose observations it carries (OTel SDKs keep 128).
MAX_LINKS = 128
OBSERVE_SPAN, ESTIMATE_SPAN = "predictor.observe", "predictor.estimate"
OBSERVATIONS = "astraea.predictor.observations"

# Reconnect quickly after an outage (gRPC's default backoff grows to two minutes).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(e, grpc.aio.AioRpcError):
        if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        if e.code() is grpc.StatusCode.UNAVAILABLE:
            return "unavailable"
    return "error"


class PredictorLink:
    """A `ServiceTimeEstimator` answering locally and learning/refreshing remotely."""

    name = "remote"

    def __init__(self, address: str, *, local: OnlineJobEstimator | None = None,
                 metrics: Metrics | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 flush_interval_s: float = 0.1, refresh_interval_s: float = 1.0,
                 retry_interval_s: float = 0.5, max_pending: int = 100_000,
                 stale_after_s: float | None = None, tracer: Tracer | None = None,
                 credentials: ClientCredentials | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.address = address
        self.credentials = credentials or ClientCredentials()  # the predictor's key and TLS
        self.local = local or OnlineJobEstimator()
        self.metrics = metrics or Metrics(otel_metrics.get_meter("astraea"))
        self.timeout_s = timeout_s
        self.flush_interval_s = flush_interval_s
        self.refresh_interval_s = refresh_interval_s
        self.retry_interval_s = retry_interval_s
        self.stale_after_s = (stale_after_s if stale_after_s is not None
                              else 3 * refresh_interval_s + timeout_s)
        self._api_pending: deque[predictor_pb2.ApiObservation] = deque(maxlen=max_pending)
        self._out_pending: deque[predictor_pb2.OutputObservation] = deque(maxlen=max_pending)
        self._step_pending: deque[common_pb2.StepTiming] = deque(maxlen=max_pending)
        # The spans current when API durations were observed (a job's api_wait): each batch
        # is one call for many jobs, so its span links to theirs rather than joining one trace.
        self._links: deque[SpanContext] = deque(maxlen=MAX_LINKS)
        self.tracer = tracer or trace.get_tracer("astraea.control_plane")
        self._categories: dict[str, None] = {}  # insertion-ordered set, bounded
        self._remote_api: dict[str, float] = {}
        self._remote_out: dict[tuple[str, bool], float] = {}
        self._remote_at: float | None = None  # monotonic time of the last refresh
        self._remote_seen = (0, 0)  # (API, output) observations the predictor had learned from
        self.up: bool | None = None  # None until the first call answers or fails
        self._down_since: float | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: predictor_pb2_grpc.PredictorServiceStub | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # Counters for tests and logs.
        self.sent = 0  # observations the predictor accepted
        self.refreshes = 0  # successful Estimate calls
        self.failures = 0  # failed calls

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the channel and start the background task (on the running loop)."""
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._channel = self.credentials.aio_channel(self.address, options=_CHANNEL_OPTIONS)
        self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)
        self._task = asyncio.create_task(self._run(), name="predictor-link")

    async def close(self, flush: bool = True) -> None:
        """Stop the task; with `flush`, try once (bounded by the timeout) to send what is
        queued; close the channel."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if flush and self._stub is not None and self.up is not False and self._pending():
            with contextlib.suppress(Exception):
                await self._flush()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    # --- ServiceTimeEstimator (synchronous, never blocks) -------------------------------------
    def _fresh(self) -> bool:
        return (self.up is True and self._remote_at is not None
                and time.monotonic() - self._remote_at <= self.stale_after_s)

    def _note(self, category: str | None) -> None:
        if category and category not in self._categories and len(self._categories) < MAX_CATEGORIES:
            self._categories[category] = None

    def output_tokens(self, job: Job) -> float:
        self._note(job.category)
        if self._fresh() and self._remote_seen[1] > self.local.observations()[1]:
            remote = self._remote_out.get((job.category, job.segment_index == 0))
            if remote is not None:
                return remote
        return self.local.output_tokens(job)

    def api_duration_s(self, job: Job) -> float:
        self._note(job.next_tool_category)
        if self._fresh() and self._remote_seen[0] > self.local.observations()[0]:
            remote = self._remote_api.get(job.next_tool_category or "")
            if remote is not None:
                return remote
        return self.local.api_duration_s(job)

    def remaining_api_s(self, job: Job, now: float) -> float:
        return self.local.remaining_api_s(job, now)

    def api_duration_samples(self, category: str) -> list[float]:
        return self.local.api_duration_samples(category)

    def observe_output(self, job: Job, tokens: int) -> None:
        self.local.observe_output(job, tokens)
        category = job.category or UNKNOWN_CATEGORY
        self._note(category)
        self._out_pending.append(predictor_pb2.OutputObservation(
            category=category, segment_index=job.segment_index, output_tokens=max(0, tokens)))
        self._kick()

    def observe_api(self, category: str, duration_s: float) -> None:
        self.local.observe_api(category, duration_s)  # raises on a negative duration
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            self._links.append(ctx)
        category = category or UNKNOWN_CATEGORY
        self._note(category)
        # The predictor refuses a batch holding a duration beyond its bound (its default is
        # MAX_FORWARDED_API_S): one such wait must not cost the batch's other observations.
        if math.isfinite(duration_s) and duration_s <= MAX_FORWARDED_API_S:
            self._api_pending.append(predictor_pb2.ApiObservation(
                category=category, duration_s=duration_s))
            self._kick()

    def observe_steps(self, steps: Iterable[common_pb2.StepTiming]) -> None:
        """Engine step timings from a worker's StepReport, for the remote step-time model.
        Steps the predictor would reject (and with them the whole batch) are dropped here."""
        for s in steps:
            if (s.tokens == 0 or s.decode_tokens > s.tokens
                    or not (math.isfinite(s.duration_s) and s.duration_s >= 0)):
                continue
            step = common_pb2.StepTiming()
            step.CopyFrom(s)
            self._step_pending.append(step)
        self._kick()

    # --- background I/O -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._pending() >= MAX_BATCH:
            self._wake.set()

    def _pending(self) -> int:
        return len(self._api_pending) + len(self._out_pending) + len(self._step_pending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = 0.0
        while True:
            try:
                if self.up is False:
                    # Down: one probe per retry interval (an Estimate: it also refreshes).
                    await self._refresh()
                    next_refresh = loop.time() + self.refresh_interval_s
                    await self._flush()
                else:
                    await self._flush()
                    if loop.time() >= next_refresh:
                        await self._refresh()
                        next_refresh = loop.time() + self.refresh_interval_s
            except asyncio.CancelledError:
                raise
            except _CallFailed:
                pass
            except Exception:  # a bug here must not stop the link for good
                log.exception("predictor link iteration failed")
            interval = self.retry_interval_s if self.up is False else self.flush_interval_s
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def _call(self, method, request):
        try:
            # Inside the caller's span: the predictor's server span becomes its child.
            response = await asyncio.wait_for(
                method(request, timeout=self.timeout_s, metadata=inject_metadata(
                    metadata=self.credentials.metadata)),
                self.timeout_s * 1.5)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if (isinstance(e, grpc.aio.AioRpcError)
                    and e.code() is grpc.StatusCode.INVALID_ARGUMENT):
                raise  # the request, not the predictor: the caller drops it
            self._failed(_reason(e), e)
            raise _CallFailed from e
        self._succeeded()
        return response

    def _failed(self, reason: str, e: BaseException) -> None:
        self.failures += 1
        self.metrics.predictor_fallback(reason)
        if self.up is not False:
            self.up = False
            self._down_since = time.monotonic()
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            log.warning("predictor unreachable, using local estimates", address=self.address,
                        reason=reason, error=detail)

    def _succeeded(self) -> None:
        if self.up is False:
            outage = time.monotonic() - (self._down_since or time.monotonic())
            log.info("predictor reachable again, using its estimates", address=self.address,
                     outage_s=round(outage, 3))
        elif self.up is None:
            log.info("predictor connected", address=self.address)
        self.up = True
        self._down_since = None

    async def _flush(self) -> None:
        """Send everything queued, in batches of at most MAX_BATCH."""
        assert self._stub is not None
        while self._pending():
            req = predictor_pb2.ObserveRequest()
            room = MAX_BATCH
            for queue, field in ((self._api_pending, req.api_calls),
                                 (self._out_pending, req.outputs),
                                 (self._step_pending, req.steps)):
                take = min(room, len(queue))
                field.extend(queue.popleft() for _ in range(take))
                room -= take
            links = [Link(c) for c in self._links]
            self._links.clear()
            try:
                with self.tracer.start_as_current_span(
                        OBSERVE_SPAN, kind=SpanKind.CLIENT, links=links,
                        attributes={OBSERVATIONS: len(req.api_calls) + len(req.outputs)
                                    + len(req.steps)}):
                    resp = await self._call(self._stub.Observe, req)
            except _CallFailed as e:
                if _reason(e.__cause__) == "unavailable":
                    self._requeue(req)  # not delivered: send it after recovery
                raise
            except grpc.aio.AioRpcError as e:
                log.warning("predictor rejected observations, dropped", error=e.details(),
                            count=len(req.api_calls) + len(req.outputs) + len(req.steps))
                continue
            self.sent += resp.accepted

    def _requeue(self, req: predictor_pb2.ObserveRequest) -> None:
        for queue, items in ((self._api_pending, req.api_calls),
                             (self._out_pending, req.outputs),
                             (self._step_pending, req.steps)):
            room = (queue.maxlen or 0) - len(queue)
            items = list(items)[-room:] if room > 0 else []
            queue.extendleft(reversed(items))

    async def _refresh(self) -> None:
        assert self._stub is not None
        cats = list(self._categories) or [""]
        req = predictor_pb2.EstimateBatchRequest()
        for cat in cats:
            for seg in (0, 1):
                req.requests.add(job_id=f"{cat}#{seg}", category=cat, segment_index=seg)
        try:
            with self.tracer.start_as_current_span(ESTIMATE_SPAN, kind=SpanKind.CLIENT):
                resp = await self._call(self._stub.Estimate, req)
        except grpc.aio.AioRpcError as e:
            log.warning("predictor rejected estimate request", error=e.details())
            return
        api: dict[str, float] = {}
        out: dict[tuple[str, bool], float] = {}
        for r, est in zip(req.requests, resp.estimates):
            if est.source != predictor_pb2.ESTIMATE_SOURCE_MODEL:
                continue
            if r.segment_index == 0:
                api[r.category] = est.api_total_s
            out[(r.category, r.segment_index == 0)] = est.output_tokens
        self._remote_api, self._remote_out = api, out
        self._remote_seen = (resp.api_observations, resp.output_observations)
        self._remote_at = time.monotonic()
        self.refreshes += 1


class _CallFailed(Exception):
    """A call to the predictor timed out or failed (already logged and counted)."""
