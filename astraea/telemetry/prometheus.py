"""Prometheus' pull format: `GET /metrics` on a port of its own, for every service.

    astraea-control-plane --metrics-port 9464          # or ASTRAEA_METRICS_PORT=9464

Off unless a port is given (0 or absent: off), so tests and benchmarks run as before; it
listens on 127.0.0.1 unless `--metrics-host` (or ASTRAEA_METRICS_HOST) says otherwise.

Why `prometheus-client` and not OpenTelemetry's Prometheus exporter: the names scrapers look
for are fixed strings. The Kubernetes Gateway API Inference Extension's endpoint picker and
every vLLM dashboard read `vllm:num_requests_running` and friends, and OTel's
name translation (dots to underscores, unit suffixes added) cannot be relied on to keep a
colon name as it is. vLLM, SGLang and TGI all expose their metrics through prometheus-client;
the OTLP instruments (metrics.py) stay as they are and the two are fed side by side.

What each service exposes (names in Prometheus' own form; see README "Metrics"):

* control plane, predictor: `astraea_rpc_requests_total{method,code}` and
  `astraea_rpc_duration_seconds{method}` (a streaming RPC counts once, at its end);
* control plane: `astraea_job_jct_seconds{policy,category}`,
  `astraea_decision_latency_seconds{kind}`, `astraea_predictor_fallbacks_total{reason}`,
  `astraea_queue_length{level}`, `astraea_kv_utilization{worker_id}`,
  `astraea_jobs_in_flight`, `astraea_kv_decisions_total{action,cause}` (the `Metrics`
  instruments, mirrored: `Metrics.export_prometheus`);
* gateway: `astraea_http_requests_total{method,route,status}` and
  `astraea_http_request_duration_seconds{method,route}` (a stream: until its last byte);
* worker: vLLM's gauges and the KV counters (worker_metrics.py).

The HTTP server is prometheus-client's own, on a daemon thread: a scrape runs the gauges'
callbacks on that thread, so they only read what another thread may read (see `_read`).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from astraea.plan import decision_labels

DEFAULT_METRICS_HOST = "127.0.0.1"
PORT_ENV, HOST_ENV = "ASTRAEA_METRICS_PORT", "ASTRAEA_METRICS_HOST"
# From a fast unary call (~1 ms) to a long streamed segment (minutes).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                     30, 60, 300)


class MetricsConfigError(ValueError):
    """A bad --metrics-port / --metrics-host (or their environment variables)."""


@dataclass(frozen=True)
class MetricsEndpoint:
    host: str
    port: int


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """Every service's `--metrics-port` and `--metrics-host` (`endpoint_from_args` reads them)."""
    group = parser.add_argument_group("metrics")
    group.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="serve GET /metrics (Prometheus text format) on this port; 0: "
                            f"off (default: ${PORT_ENV}, else off)")
    group.add_argument("--metrics-host", default=None, metavar="HOST",
                       help=f"address the /metrics server binds (default: ${HOST_ENV}, else "
                            f"{DEFAULT_METRICS_HOST})")


def endpoint_from_args(args: argparse.Namespace,
                       env: Mapping[str, str] | None = None) -> MetricsEndpoint | None:
    """The /metrics endpoint the flags (or, in their absence, the environment) ask for; None
    when metrics are off. Raises `MetricsConfigError` naming the bad setting."""
    env = os.environ if env is None else env
    port, where = getattr(args, "metrics_port", None), "--metrics-port"
    if port is None:
        raw, where = env.get(PORT_ENV, "").strip(), PORT_ENV
        try:
            port = int(raw) if raw else 0
        except ValueError:
            raise MetricsConfigError(f"{PORT_ENV}={raw!r}: not a port number") from None
    if not 0 <= port <= 65535:
        raise MetricsConfigError(f"{where} {port}: must be 0 (off) to 65535")
    host = getattr(args, "metrics_host", None) or env.get(HOST_ENV, "").strip() \
        or DEFAULT_METRICS_HOST
    return MetricsEndpoint(host, port) if port else None


class Exposition:
    """One service's registry and the HTTP server that serves it. Families are created when
    a part of the service asks for them (`rpc`, `http`), so each service shows its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            # A registry of our own (tests build several per process), with what the default
            # one has: process_* (CPU, memory, file descriptors) and python_* (GC, version).
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self._lock = threading.Lock()
        self._rpc: RpcMetrics | None = None
        self._http: HttpMetrics | None = None
        self._server = None

    def serve(self, host: str = DEFAULT_METRICS_HOST, port: int = 0) -> int:
        """Start serving `GET /metrics` on host:port (0: any free port); returns the port."""
        try:
            self._server, _thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        return self.port

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def rpc(self) -> RpcMetrics:
        with self._lock:
            if self._rpc is None:
                self._rpc = RpcMetrics(self.registry)
            return self._rpc

    def http(self) -> HttpMetrics:
        with self._lock:
            if self._http is None:
                self._http = HttpMetrics(self.registry)
            return self._http


# --- the process's exposition (what a service's main() made; like OTel's global provider) ---

_active: Exposition | None = None


def install(exposition: Exposition | None) -> None:
    """Make `exposition` the process's (None: none); `setup_service_telemetry` does it."""
    global _active
    _active = exposition


def active() -> Exposition | None:
    return _active


def aio_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """For `grpc.aio.server(interceptors=[*aio_server_interceptors(), ...])`: first, so that
    it also sees the statuses the interceptors after it answer. Empty with metrics off."""
    return [] if _active is None else [AioRpcInterceptor(_active.rpc())]


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """The same for a thread-pool `grpc.server`."""
    return [] if _active is None else [RpcInterceptor(_active.rpc())]


def export_scheduler(metrics) -> None:
    """The control plane's `Metrics` recorded into the process's registry too (no-op with
    metrics off)."""
    if _active is not None:
        metrics.export_prometheus(_active.registry)


def metered_backend(backend):
    """A worker's backend wrapped to feed the worker's metrics (worker_metrics.py); the
    backend itself with metrics off."""
    if _active is None:
        return backend
    from astraea.telemetry.worker_metrics import MeteredBackend

    return MeteredBackend(backend, _active.registry)


def instrument_asgi(app):
    """`app` wrapped to count and time its HTTP requests; `app` itself with metrics off."""
    return app if _active is None else HttpMetricsMiddleware(app, _active.http())


# --- gRPC servers --------------------------------------------------------------------------


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("astraea_rpc_requests", "gRPC calls handled, by final status",
                                ["method", "code"], registry=registry)
        self.duration = Histogram("astraea_rpc_duration_seconds",
                                  "gRPC call duration, start to final status", ["method"],
                                  buckets=LATENCY_BUCKETS_S, registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.duration.labels(method).observe(seconds)


def _code_name(code) -> str:
    """A status code as its name (OK when the handler set none)."""
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _ended_code(context) -> str:
    """The status of a call whose handler returned: the one it set, unless the client went
    away first (a handler that watches for that returns normally, e.g. a Watch stream)."""
    gone = context.cancelled() if hasattr(context, "cancelled") else not context.is_active()
    if gone:
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return _code_name(context.code())


def _failed_code(context, exc: BaseException) -> str:
    """The status a call that raised ends with: the one it aborted with, else UNKNOWN (or
    CANCELLED, the client having gone away)."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return _code_name(code)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    # A thread-pool server's streaming handler may raise when its client went away (the
    # health service's Watch does): that is the client's cancellation, not a crash.
    gone = context.cancelled() if hasattr(context, "cancelled") else not context.is_active()
    return "CANCELLED" if gone else "UNKNOWN"


class AioRpcInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call of a `grpc.aio` server, whatever its shape."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method, m = handler_call_details.method, self.metrics
        name = ("stream" if handler.request_streaming else "unary") + "_" + \
            ("stream" if handler.response_streaming else "unary")
        inner = getattr(handler, name)
        if inspect.isasyncgenfunction(inner):
            async def streaming(request_or_iterator, context):
                t0, code = time.perf_counter(), None
                try:
                    async for resp in inner(request_or_iterator, context):
                        yield resp
                    code = _ended_code(context)
                except BaseException as e:
                    code = _failed_code(context, e)
                    raise
                finally:
                    # A generator closed by the server (client gone) ends here with no code.
                    m.observe(method, code or "CANCELLED", time.perf_counter() - t0)
            return handler._replace(**{name: streaming})

        # A coroutine: it returns the response, or writes a stream with context.write().
        async def coroutine(request_or_iterator, context):
            t0 = time.perf_counter()
            try:
                resp = await inner(request_or_iterator, context)
            except BaseException as e:
                m.observe(method, _failed_code(context, e), time.perf_counter() - t0)
                raise
            m.observe(method, _ended_code(context), time.perf_counter() - t0)
            return resp
        return handler._replace(**{name: coroutine})


class RpcInterceptor(grpc.ServerInterceptor):
    """The same for a thread-pool server (the predictor's)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method, m = handler_call_details.method, self.metrics
        if handler.response_streaming:
            name = "stream_stream" if handler.request_streaming else "unary_stream"
            inner = getattr(handler, name)

            def streaming(request_or_iterator, context):
                t0, code = time.perf_counter(), None
                try:
                    yield from inner(request_or_iterator, context)
                    code = _ended_code(context)
                except BaseException as e:
                    code = _failed_code(context, e)
                    raise
                finally:
                    m.observe(method, code or "CANCELLED", time.perf_counter() - t0)
            return handler._replace(**{name: streaming})
        name = "stream_unary" if handler.request_streaming else "unary_unary"
        inner = getattr(handler, name)

        def unary(request_or_iterator, context):
            t0 = time.perf_counter()
            try:
                resp = inner(request_or_iterator, context)
            except BaseException as e:
                m.observe(method, _failed_code(context, e), time.perf_counter() - t0)
                raise
            m.observe(method, _ended_code(context), time.perf_counter() - t0)
            return resp
        return handler._replace(**{name: unary})


# --- HTTP (the gateway) ----------------------------------------------------------------------


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("astraea_http_requests", "HTTP requests answered, by status",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram("astraea_http_request_duration_seconds",
                                  "HTTP request duration, to the response's last byte",
                                  ["method", "route"], buckets=LATENCY_BUCKETS_S,
                                  registry=registry)


class HttpMetricsMiddleware:
    """ASGI middleware. The route label is the matched route's path template (e.g.
    ``/v1/responses/{response_id}``), or ``unmatched``: a label per raw path would let any
    client grow the series without bound."""

    def __init__(self, app, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    def __getattr__(self, name: str):  # the wrapped app's attributes (state, routes, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500  # an app that raises before answering: a 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.perf_counter() - t0)


# --- the scheduler's instruments (control plane) --------------------------------------------


def _read(source: Callable[[], Mapping] | None) -> Mapping:
    """A gauge source's values, read on the scrape thread while the event loop may be changing
    the dict it iterates: a "changed size during iteration" is retried, then given up."""
    if source is None:
        return {}
    for _ in range(3):
        try:
            return dict(source())
        except RuntimeError:
            continue
    return {}


class SchedulerFamilies:
    """The `Metrics` instruments in Prometheus form; `Metrics` records into both."""

    def __init__(self, registry: CollectorRegistry, metrics) -> None:
        from astraea.telemetry.metrics import DECISION_BUCKETS_MS, JCT_BUCKETS_S

        self.jct = Histogram("astraea_job_jct_seconds", "Job completion time, arrival to finish",
                             ["policy", "category"], buckets=JCT_BUCKETS_S, registry=registry)
        self.decision_latency = Histogram(
            "astraea_decision_latency_seconds", "Wall time of a scheduling decision", ["kind"],
            buckets=[b / 1000 for b in DECISION_BUCKETS_MS], registry=registry)
        self.predictor_fallbacks = Counter(
            "astraea_predictor_fallbacks", "Predictor calls answered by local estimates",
            ["reason"], registry=registry)
        self._metrics = metrics
        registry.register(self)

    def collect(self):
        m = self._metrics
        queues = GaugeMetricFamily("astraea_queue_length", "Ready jobs per MLFQ level",
                                   labels=["level"])
        for level, n in sorted(_read(m._queue_source).items()):
            queues.add_metric([str(level)], n)
        kv = GaugeMetricFamily("astraea_kv_utilization",
                               "Fraction of a worker's GPU KV blocks in use", labels=["worker_id"])
        for worker, u in sorted(_read(m._kv_source).items(), key=lambda wu: str(wu[0])):
            kv.add_metric([str(worker)], u)
        yield from (queues, kv)
        if m._step_ratio_source is not None:
            steps = GaugeMetricFamily(
                "astraea_step_time_ratio", "A worker's engine step times over the cost "
                "model's price for the same steps (recent steps; 1: the profile is calibrated)",
                labels=["worker_id"])
            for worker, r in sorted(_read(m._step_ratio_source).items(),
                                    key=lambda wr: str(wr[0])):
                steps.add_metric([str(worker)], r)
            yield steps
        if m._decision_source is not None:
            decisions = CounterMetricFamily(
                "astraea_kv_decisions", "KV decisions made, by action and cause",
                labels=["action", "cause"])
            for key, n in sorted(_read(m._decision_source).items()):
                decisions.add_metric(list(decision_labels(key)), n)
            yield decisions
        if m._jobs_in_flight_source is not None:
            yield GaugeMetricFamily("astraea_jobs_in_flight", "Jobs started and not finished",
                                    value=m._jobs_in_flight_source())

    def describe(self):
        return []  # names come from collect(), at scrape time
