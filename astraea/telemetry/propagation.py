"""W3C trace-context propagation over gRPC metadata, so one job's trace spans client, control
plane, predictor and worker.

Client side: ``stub.Method(req, metadata=inject_metadata())`` inside the span the call belongs
to. Server side: ``tracer.start_as_current_span(name, context=extract_context(context))`` (or
``parent=`` of the span helpers). Both use the global propagator (W3C ``traceparent`` and
baggage unless OTEL_PROPAGATORS says otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate
from opentelemetry.context import Context


def inject_metadata(context: Context | None = None,
                    metadata: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """gRPC call metadata carrying `context` (default: the current one), appended to
    `metadata`. Empty additions when there is no valid span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [*metadata, *((k.lower(), v) for k, v in carrier.items())]


def _items(metadata: Any) -> Iterable[tuple[str, Any]]:
    if metadata is None:
        return ()
    if isinstance(metadata, Mapping):
        return metadata.items()
    # Tuples of (key, value), or grpc's _Metadatum objects (also indexable as pairs).
    return ((getattr(m, "key", None) or m[0], getattr(m, "value", None) or m[1])
            for m in metadata)


def extract_context(source: Any) -> Context:
    """The trace context a caller sent: `source` is a gRPC servicer context (sync or aio), or
    its invocation metadata (pairs or a mapping). No or bad trace headers give an empty
    context, so a span started with it is a new root."""
    metadata = source.invocation_metadata() if hasattr(source, "invocation_metadata") else source
    carrier = {str(k).lower(): v for k, v in _items(metadata)
               if isinstance(v, str)}  # binary (-bin) values are never trace headers
    return propagate.extract(carrier)
