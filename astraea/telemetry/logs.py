"""structlog JSON logs carrying the current trace (docs/design.md, Telemetry conventions).

Each line is one JSON object with ``timestamp`` (ISO 8601, UTC), ``level``, ``event``,
``logger``, any bound keys and — when a span is current — ``trace_id`` and ``span_id`` in the
OpenTelemetry hex form (32 and 16 lower-case digits), so a log line finds its trace.

``job_id`` is not special: callers bind it, once per job, and every line of that logger then
carries it::

    log = get_logger("astraea.control_plane", job_id=job.job_id)
    log.info("segment admitted", worker_id=3, queue_level=1)

or, for everything logged on the current task or thread,
``structlog.contextvars.bind_contextvars(job_id=...)``. With ``capture_stdlib`` (the default) records of the standard ``logging``
module (e.g. ``astraea.predictor``) are rendered the same way.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog
from opentelemetry import trace

_write_lock = threading.Lock()
_HANDLER_TAG = "_astraea_telemetry"


def add_trace_context(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: add the current span's ``trace_id`` and ``span_id``, if any."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", trace.format_trace_id(ctx.trace_id))
        event_dict.setdefault("span_id", trace.format_span_id(ctx.span_id))
    return event_dict


class _StreamLogger:
    """Writes each rendered line to `stream`, or to whatever `sys.stderr` is at write time (so
    redirecting or capturing stderr after configuration still works)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        with _write_lock:
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StreamLoggerFactory:
    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, *_args: Any) -> _StreamLogger:
        return _StreamLogger(self._stream)


class _LazyStreamHandler(logging.StreamHandler):
    """A StreamHandler that, without an explicit stream, writes to the current sys.stderr."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._explicit = stream
        super().__init__(stream)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return self._explicit or sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._explicit = value


def _renderer(json: bool):
    return structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(
        colors=False)


def configure_logging(level: str = "info", *, json: bool = True, stream: TextIO | None = None,
                      capture_stdlib: bool = True) -> logging.Handler | None:
    """Configure structlog process-wide (it is global state); safe to call again.

    `stream` defaults to stderr. With `capture_stdlib` the root `logging` logger gets one
    handler rendering its records the same way (replacing a previous one from here); it is
    returned so a caller (a test) can remove it.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not a logging level")
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            add_trace_context,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _renderer(json),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StreamLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    if not capture_stdlib:
        return None
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(h)
    handler = _LazyStreamHandler(stream)
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
            add_trace_context,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _renderer(json)],
    ))
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


def get_logger(name: str, **bound: Any) -> Any:
    """A structlog logger whose lines carry ``logger=name`` and the `bound` keys (e.g.
    ``job_id``)."""
    # Lazy, not `structlog.get_logger().bind(...)` now: a module-level logger created at
    # import, before the service's main() configures structlog, must still render with the
    # configuration in force when it logs.
    return _LazyLogger({"logger": name, **bound})


class _LazyLogger:
    """Binds its context to a logger of the current structlog configuration at each use."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context

    def _current(self) -> Any:
        return structlog.get_logger().bind(**self._context)

    def bind(self, **values: Any) -> _LazyLogger:
        return _LazyLogger({**self._context, **values})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)
