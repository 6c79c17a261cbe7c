"""Observability for every Astraea service: traces, metrics and logs, set up alike in each.

The conventions (span names, attributes, metrics) are in docs/design.md, "Telemetry
conventions".

A service does, once at start::

    from astraea import telemetry

    tel = telemetry.setup_telemetry(
        telemetry.TelemetryConfig.from_env("astraea-control-plane"), install_global=True)
    log = telemetry.get_logger("astraea.control_plane")
    tel.metrics.set_queue_length_source(lambda: {lvl: len(q) for lvl, q in ...})
    ...
    tel.shutdown()

- `setup` — `TelemetryConfig` (OTLP endpoint or none, console, log level) and the providers;
- `spans` — the ``job`` / ``segment`` / ``api_wait`` / ``build_batch`` spans and their
  ``astraea.*`` attributes, KV decisions with their inputs;
- `metrics` — queue lengths, KV utilisation, JCT, decision latency, predictor fallbacks;
- `logs` — structlog JSON lines with ``trace_id``/``span_id`` of the current span and whatever
  the caller binds (``job_id``);
- `propagation` — W3C trace context in gRPC metadata.
"""

from astraea.telemetry.logs import add_trace_context, configure_logging, get_logger
from astraea.telemetry.metrics import Metrics
from astraea.telemetry.propagation import extract_context, inject_metadata
from astraea.telemetry.setup import (
    Telemetry,
    TelemetryConfig,
    TelemetryConfigError,
    add_log_level_argument,
    setup_service_telemetry,
    setup_telemetry,
)
from astraea.telemetry.spans import (
    api_wait_span,
    build_batch_span,
    finish_api_wait,
    finish_job,
    finish_segment,
    job_span,
    kv_decision_attributes,
    record_kv_decision,
    record_plan,
    segment_span,
    start_api_wait_span,
    start_job_span,
    start_segment_span,
)

__all__ = [
    "Metrics", "Telemetry", "add_log_level_argument", "TelemetryConfig", "TelemetryConfigError", "add_trace_context",
    "api_wait_span", "build_batch_span", "configure_logging", "extract_context",
    "finish_api_wait", "finish_job", "finish_segment", "get_logger", "inject_metadata",
    "job_span", "kv_decision_attributes", "record_kv_decision", "record_plan", "segment_span",
    "setup_service_telemetry", "setup_telemetry", "start_api_wait_span", "start_job_span", "start_segment_span",
]
