"""Configuration and providers: `TelemetryConfig`, `setup_telemetry` and the `Telemetry` handle.

Every service builds one `Telemetry` at start (with `install_global=True`) and shuts it down on
exit. Tests build as many isolated instances as they like: without `install_global` nothing
global is touched, and the instance's `tracer`, `meter` and `metrics` are used directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from astraea.telemetry import prometheus
from astraea.telemetry.metrics import Metrics

INSTRUMENTATION_SCOPE = "astraea"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class TelemetryConfigError(ValueError):
    """A telemetry setting is invalid; the message names it."""


@dataclass(frozen=True)
class TelemetryConfig:
    """How one service reports traces, metrics and logs.

    `otlp_endpoint`: an OTLP/gRPC collector, e.g. ``http://127.0.0.1:4317`` (``http://`` means
    plaintext, ``https://`` TLS); None exports nothing over OTLP. `console` also prints finished
    spans to stdout. With no destination at all, spans are not recorded (`_WhenExported`): they
    keep their trace ids, for logs and propagation, and cost next to nothing.
    `span_dir` also appends every finished span, one JSON object per line, to
    ``<span_dir>/<service_name>-<pid>.jsonl`` (read them with `astraea traces`): traces without
    a collector. `export_timeout_s` bounds every OTLP export, so a dead collector costs a
    service at most that long at shutdown.
    """

    service_name: str
    otlp_endpoint: str | None = None
    console: bool = False
    span_dir: str | None = None
    log_level: str = "info"
    json_logs: bool = True
    export_timeout_s: float = 10.0
    metric_export_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.service_name:
            raise TelemetryConfigError("service_name is empty")
        level = self.log_level.lower()
        if level not in LOG_LEVELS:
            raise TelemetryConfigError(
                f"log_level {self.log_level!r}: must be one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", level)
        if not self.export_timeout_s > 0:
            raise TelemetryConfigError(f"export_timeout_s is {self.export_timeout_s}: must be > 0")
        if not self.metric_export_interval_s > 0:
            raise TelemetryConfigError(
                f"metric_export_interval_s is {self.metric_export_interval_s}: must be > 0")

    @classmethod
    def from_env(cls, service_name: str, env: Mapping[str, str] | None = None,
                 **overrides) -> TelemetryConfig:
        """Read OTEL_EXPORTER_OTLP_ENDPOINT (empty or unset: no OTLP), ASTRAEA_TELEMETRY_CONSOLE
        (1/true/yes/on), ASTRAEA_TELEMETRY_SPAN_DIR (a directory for span files) and
        ASTRAEA_LOG_LEVEL (debug … critical, default info); keyword `overrides` win over the
        environment."""
        env = os.environ if env is None else env
        console_raw = env.get("ASTRAEA_TELEMETRY_CONSOLE", "").strip().lower()
        if console_raw not in _TRUE | _FALSE:
            raise TelemetryConfigError(
                f"ASTRAEA_TELEMETRY_CONSOLE={console_raw!r}: use 1/true/yes/on or 0/false/no/off")
        values = {
            "otlp_endpoint": env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None,
            "console": console_raw in _TRUE,
            "span_dir": env.get("ASTRAEA_TELEMETRY_SPAN_DIR", "").strip() or None,
            "log_level": env.get("ASTRAEA_LOG_LEVEL", "").strip() or "info",
        }
        values.update(overrides)
        return cls(service_name=service_name, **values)


@dataclass
class Telemetry:
    """One service's providers, its tracer and meter, and the instruments (`metrics`)."""

    config: TelemetryConfig
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics: Metrics
    tracer: trace.Tracer
    meter: otel_metrics.Meter
    span_processors: list[SpanProcessor] = field(default_factory=list)  # every one added
    metric_readers: tuple[MetricReader, ...] = ()
    exposition: prometheus.Exposition | None = None  # GET /metrics, when a port was given
    _shut_down: bool = field(default=False, repr=False)

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Attach a span processor, e.g. ``SimpleSpanProcessor(InMemorySpanExporter())``."""
        self.tracer_provider.add_span_processor(processor)
        self.span_processors.append(processor)

    def add_span_exporter(self, exporter) -> None:
        """Attach an exporter that receives each span as it ends (a SimpleSpanProcessor)."""
        self.add_span_processor(SimpleSpanProcessor(exporter))

    def force_flush(self, timeout_s: float | None = None) -> bool:
        ms = int(1000 * (timeout_s if timeout_s is not None else self.config.export_timeout_s))
        ok = self.tracer_provider.force_flush(ms)
        return self.meter_provider.force_flush(ms) and ok

    def shutdown(self) -> None:
        """Flush and stop both providers; idempotent. Each OTLP export gives up after
        `config.export_timeout_s`, so an unreachable collector does not hang the caller."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.exposition is not None:
            self.exposition.close()
            if prometheus.active() is self.exposition:
                prometheus.install(None)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=1000 * self.config.export_timeout_s)


def setup_telemetry(config: TelemetryConfig, *, install_global: bool = False,
                    metric_readers: Sequence[MetricReader] = (),
                    configure_logs: bool | None = None) -> Telemetry:
    """Build the tracer and meter providers for `config` (see `TelemetryConfig`).

    `install_global=True` makes them the process-wide OpenTelemetry providers (what a service
    wants, so libraries and `opentelemetry.trace.get_tracer` see them), registers their
    shutdown at exit, and configures structlog. Without it nothing global changes.
    `metric_readers` are added to the OTLP one (tests pass an `InMemoryMetricReader`).
    `configure_logs` overrides whether structlog is configured (default: `install_global`).
    """
    resource = Resource.create({SERVICE_NAME: config.service_name})
    timeout_ms = 1000 * config.export_timeout_s

    processors: list[SpanProcessor] = []
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=install_global,
                                     sampler=_WhenExported(processors))
    readers: list[MetricReader] = list(metric_readers)
    if config.otlp_endpoint:
        # Imported here: the gRPC exporter pulls in its generated protos, which a service
        # without a collector never needs.
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout_s),
            export_timeout_millis=timeout_ms))
        readers.append(PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout_s),
            export_interval_millis=1000 * config.metric_export_interval_s,
            export_timeout_millis=timeout_ms))
    if config.console:
        # sys.stdout as it is now (the exporter's default is the one at import time).
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
    if config.span_dir:
        processors.append(BatchSpanProcessor(_span_file_exporter(config),
                                             export_timeout_millis=timeout_ms))
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                   shutdown_on_exit=install_global)

    tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
    meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE)
    # The same list object the sampler reads: a processor added later turns recording on.
    tel = Telemetry(config=config, tracer_provider=tracer_provider,
                    meter_provider=meter_provider, metrics=Metrics(meter),
                    tracer=tracer, meter=meter, span_processors=processors,
                    metric_readers=tuple(readers))
    if install_global:
        trace.set_tracer_provider(tracer_provider)
        otel_metrics.set_meter_provider(meter_provider)
    if install_global if configure_logs is None else configure_logs:
        from astraea.telemetry.logs import configure_logging

        configure_logging(level=config.log_level, json=config.json_logs)
    return tel


class _WhenExported(Sampler):
    """The SDK's default sampler (OTEL_TRACES_SAMPLER, else parent-based always-on) while at
    least one span processor is attached; without one, nothing is recorded. Recording spans
    that no processor receives cost the control plane about a fifth of its CPU per segment.
    A dropped span still has a trace id (logs, propagation), but passes on "not sampled"."""

    def __init__(self, processors: Sequence[SpanProcessor]) -> None:
        self._processors = processors
        try:  # what TracerProvider uses when given no sampler (not public API)
            from opentelemetry.sdk.trace.sampling import _get_from_env_or_default
        except ImportError:  # pragma: no cover - a future SDK
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

            self._base: Sampler = ParentBased(ALWAYS_ON)
        else:
            self._base = _get_from_env_or_default()

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None) -> SamplingResult:
        if not self._processors:
            parent = trace.get_current_span(parent_context).get_span_context()
            return SamplingResult(Decision.DROP, None,
                                  parent.trace_state if parent.is_valid else None)
        return self._base.should_sample(parent_context, trace_id, name, kind, attributes,
                                        links, trace_state)

    def get_description(self) -> str:
        return f"WhenExported{{{self._base.get_description()}}}"


def _span_file_exporter(config: TelemetryConfig) -> ConsoleSpanExporter:
    """JSON lines, one file per process (several processes never interleave a line)."""
    try:
        os.makedirs(config.span_dir, exist_ok=True)
        path = os.path.join(config.span_dir, f"{config.service_name}-{os.getpid()}.jsonl")
        out = open(path, "a", encoding="utf-8")  # noqa: SIM115 — lives as long as the process
    except OSError as e:
        raise TelemetryConfigError(f"span_dir {config.span_dir!r}: {e.strerror or e}") from e
    return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """Every service's `--log-level`, which `setup_service_telemetry` applies."""
    parser.add_argument("--log-level", default=None,
                        help="debug … critical (default: $ASTRAEA_LOG_LEVEL or info)")


def setup_service_telemetry(parser: argparse.ArgumentParser, service_name: str,
                            log_level: str | None,
                            args: argparse.Namespace | None = None) -> Telemetry:
    """What every service's main() does first: telemetry from the environment, made global
    (structlog JSON logs with trace ids), `--log-level` overriding $ASTRAEA_LOG_LEVEL. With
    `args` carrying `--metrics-port` (prometheus.add_metrics_arguments) or
    $ASTRAEA_METRICS_PORT, also `GET /metrics` on that port, from now until `shutdown()`
    (prometheus.py). A bad setting, or a port already taken, ends the program through
    `parser.error`, like any other bad flag."""
    overrides = {"log_level": log_level} if log_level else {}
    try:
        endpoint = prometheus.endpoint_from_args(args if args is not None else argparse.Namespace())
        tel = setup_telemetry(TelemetryConfig.from_env(service_name, **overrides),
                              install_global=True)
    except (TelemetryConfigError, prometheus.MetricsConfigError) as e:
        parser.error(str(e))
        raise  # parser.error exits; this keeps type checkers honest
    if endpoint is not None:
        exposition = prometheus.Exposition()
        try:
            exposition.serve(endpoint.host, endpoint.port)
        except OSError as e:
            tel.shutdown()
            parser.error(str(e))
        tel.exposition = exposition
        prometheus.install(exposition)
    return tel
