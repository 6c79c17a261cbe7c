"""astraea.telemetry: the spans of docs/design.md, KV decisions on spans, trace context over real gRPC,
structlog JSON with trace ids, the shared metrics, and OTLP setup without a collector."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from concurrent import futures

import grpc
import grpc.aio
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from astraea import telemetry as t
from astraea.plan import Admit, Evict, KvAction, KvDecision, Pause
from astraea.telemetry import spans as s


@pytest.fixture
def tel():
    reader = InMemoryMetricReader()
    tele = t.setup_telemetry(t.TelemetryConfig("astraea-test"), metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tele.add_span_processor(SimpleSpanProcessor(exporter))
    tele.spans = exporter  # type: ignore[attr-defined]
    tele.reader = reader  # type: ignore[attr-defined]
    yield tele
    tele.shutdown()


@pytest.fixture
def log_stream():
    buf = io.StringIO()
    handler = t.configure_logging("debug", stream=buf)
    yield buf
    logging.getLogger().removeHandler(handler)
    structlog.reset_defaults()


def _by_name(exporter):
    out = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


# -- config --------------------------------------------------------------------------------------

def test_config_from_env_and_validation():
    cfg = t.TelemetryConfig.from_env("svc", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "ASTRAEA_TELEMETRY_CONSOLE": "true", "ASTRAEA_LOG_LEVEL": "DEBUG"})
    assert (cfg.otlp_endpoint, cfg.console, cfg.log_level, cfg.json_logs) == (
        "http://127.0.0.1:4317", True, "debug", True)
    cfg = t.TelemetryConfig.from_env("svc", env={"OTEL_EXPORTER_OTLP_ENDPOINT": " "})
    assert (cfg.otlp_endpoint, cfg.console, cfg.log_level) == (None, False, "info")
    with pytest.raises(t.TelemetryConfigError, match="log_level"):
        t.TelemetryConfig.from_env("svc", env={"ASTRAEA_LOG_LEVEL": "loud"})
    with pytest.raises(t.TelemetryConfigError, match="ASTRAEA_TELEMETRY_CONSOLE"):
        t.TelemetryConfig.from_env("svc", env={"ASTRAEA_TELEMETRY_CONSOLE": "maybe"})
    with pytest.raises(t.TelemetryConfigError, match="service_name"):
        t.TelemetryConfig("")


def test_setup_is_isolated_and_has_the_service_name(tel):
    assert trace.get_tracer_provider() is not tel.tracer_provider
    plain = t.setup_telemetry(t.TelemetryConfig("astraea-test"))
    assert (plain.span_processors, plain.metric_readers) == ([], ())  # spans made, then dropped
    with t.job_span(plain.tracer, "j", "x") as span:
        assert span.get_span_context().is_valid
    plain.shutdown()
    with tel.tracer.start_as_current_span("x"):
        pass
    (span,) = tel.spans.get_finished_spans()
    assert span.resource.attributes["service.name"] == "astraea-test"


# -- spans ---------------------------------------------------------------------------------------

def test_job_trace_has_segment_and_api_wait_children(tel):
    decision = KvDecision("j1", KvAction.SWAP, "pressure: swap hidden by budget",
                          {"utilization": 0.95, "remaining_api_s": 2.5, "pressure_weight": 1.0})
    with t.job_span(tel.tracer, "j1", "react", policy="astraea") as job:
        with t.segment_span(tel.tracer, "j1", queue_level=1, segment_index=0,
                            hrrn_score=3.5, worker_id=2) as seg:
            t.finish_segment(seg, tokens=42, ttft_s=0.12, end=False)
        with t.api_wait_span(tel.tracer, "j1", "search", predicted_s=2.0, observed_s=2.4,
                             kv_decision=decision):
            pass
        # An event-driven service starts spans in one handler and ends them in another.
        seg2 = t.start_segment_span(tel.tracer, "j1", queue_level=2, segment_index=1,
                                    parent=job)
        t.finish_segment(seg2, tokens=7, ttft_s=0.05)
        t.finish_job(job, jct_s=9.5, final_queue=2, end=False)

    spans = _by_name(tel.spans)
    (job_s,), segs, (api,) = spans["job"], spans["segment"], spans["api_wait"]
    assert job_s.parent is None
    assert dict(job_s.attributes) == {s.JOB_ID: "j1", s.CATEGORY: "react",
                                      s.POLICY: "astraea", s.JCT_S: 9.5, s.FINAL_QUEUE: 2}
    assert len(segs) == 2
    for child in [*segs, api]:
        assert child.context.trace_id == job_s.context.trace_id
        assert child.parent.span_id == job_s.context.span_id
        assert child.attributes[s.JOB_ID] == "j1"
    seg0 = next(x for x in segs if x.attributes[s.SEGMENT_INDEX] == 0)
    assert {k: seg0.attributes[k] for k in (s.QUEUE_LEVEL, s.HRRN_SCORE, s.TOKENS, s.TTFT_S,
                                            s.WORKER_ID)} == {
        s.QUEUE_LEVEL: 1, s.HRRN_SCORE: 3.5, s.TOKENS: 42, s.TTFT_S: 0.12, s.WORKER_ID: 2}
    assert api.attributes[s.TOOL_CATEGORY] == "search"
    assert (api.attributes[s.API_PREDICTED_S], api.attributes[s.API_OBSERVED_S]) == (2.0, 2.4)
    # The KV decision and every input that led to it.
    assert api.attributes[s.KV_ACTION] == "swap"
    assert api.attributes[s.KV_REASON] == "pressure: swap hidden by budget"
    assert api.attributes["astraea.kv.input.utilization"] == 0.95
    assert api.attributes["astraea.kv.input.remaining_api_s"] == 2.5
    (event,) = api.events
    assert event.name == "kv_decision"
    assert event.attributes["astraea.kv.input.pressure_weight"] == 1.0


def test_two_jobs_are_two_traces_even_when_nested(tel):
    with t.job_span(tel.tracer, "a", "x"), t.job_span(tel.tracer, "b", "x"):
        pass
    a, b = _by_name(tel.spans)["job"]
    assert a.context.trace_id != b.context.trace_id and a.parent is None and b.parent is None


def test_build_batch_span_carries_queue_lengths_and_decisions(tel):
    actions = [Admit("j1", 0, 10, 0), Admit("j2", 1, 5, 100),
               Pause("j3", 0, KvAction.PRESERVE), Evict("j4", 1, KvAction.DISCARD)]
    with t.job_span(tel.tracer, "j1", "x"):  # a plan is its own trace, not the job's
        with t.build_batch_span(tel.tracer, {0: 3, 2: 1}, step=17) as span:
            t.record_plan(span, actions, max_events=3)
            t.record_kv_decision(span, KvDecision("j3", KvAction.PRESERVE, "low memory pressure",
                                                  {"utilization": 0.4}), set_attributes=False)
    (bb,) = _by_name(tel.spans)["build_batch"]
    assert bb.parent is None
    assert tuple(bb.attributes[s.QUEUE_LENGTHS]) == (3, 0, 1)
    assert bb.attributes[s.STEP] == 17
    assert (bb.attributes[s.PLAN_ACTIONS], bb.attributes["astraea.plan.admit"],
            bb.attributes["astraea.plan.pause"], bb.attributes["astraea.plan.evict"]) == (4, 2, 1, 1)
    assert bb.attributes[s.PLAN_EVENTS_DROPPED] == 1
    assert s.KV_ACTION not in bb.attributes
    events = [(e.name, dict(e.attributes)) for e in bb.events]
    assert events[2] == ("plan_action", {s.ACTION: "pause", s.JOB_ID: "j3", s.WORKER_ID: 0,
                                         s.KV_ACTION: "preserve"})
    assert events[3] == ("kv_decision", {s.JOB_ID: "j3", s.KV_ACTION: "preserve",
                                         s.KV_REASON: "low memory pressure",
                                         "astraea.kv.input.utilization": 0.4})


def test_exception_in_a_span_marks_it_as_error(tel):
    with pytest.raises(RuntimeError), t.job_span(tel.tracer, "j", "x"):
        raise RuntimeError("boom")
    (job,) = tel.spans.get_finished_spans()
    assert job.status.status_code == trace.StatusCode.ERROR
    assert job.events[0].name == "exception"


# -- propagation over gRPC -----------------------------------------------------------------------

def test_trace_context_crosses_a_real_grpc_call(tel):
    def handle(request: bytes, context) -> bytes:
        parent = t.extract_context(context)
        with t.segment_span(tel.tracer, "j1", queue_level=0, parent=parent) as span:
            return trace.format_trace_id(span.get_span_context().trace_id).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "astraea.test.Echo", {"Trace": grpc.unary_unary_rpc_method_handler(handle)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/astraea.test.Echo/Trace")
            with t.job_span(tel.tracer, "j1", "react") as job:
                md = t.inject_metadata(metadata=[("x-other", "1")])
                server_trace_id = call(b"", metadata=md, timeout=5).decode()
            untraced = call(b"", metadata=t.inject_metadata(), timeout=5).decode()
    finally:
        server.stop(None)
    assert md[0] == ("x-other", "1") and any(k == "traceparent" for k, _ in md)
    job_ctx = job.get_span_context()
    assert server_trace_id == trace.format_trace_id(job_ctx.trace_id)
    seg = next(x for x in tel.spans.get_finished_spans()
               if x.name == "segment" and x.context.trace_id == job_ctx.trace_id)
    assert seg.parent.span_id == job_ctx.span_id and seg.parent.is_remote
    assert untraced != server_trace_id  # no span on the client: the server starts a new trace


def test_extract_context_accepts_plain_metadata():
    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    ctx = t.extract_context([("traceparent", f"00-{tid}-{sid}-01"), ("blob-bin", b"\x00")])
    sc = trace.get_current_span(ctx).get_span_context()
    assert (trace.format_trace_id(sc.trace_id), trace.format_span_id(sc.span_id)) == (tid, sid)
    aio_md = grpc.aio.Metadata(("traceparent", f"00-{tid}-{sid}-01"))  # what grpc.aio hands over
    assert trace.get_current_span(t.extract_context(aio_md)).get_span_context().span_id == int(sid, 16)
    assert not trace.get_current_span(t.extract_context({})).get_span_context().is_valid
    assert t.inject_metadata() == []  # no current span, nothing to send


# -- logs ----------------------------------------------------------------------------------------

def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_structlog_json_carries_trace_and_bound_job_id(tel, log_stream):
    log = t.get_logger("astraea.control_plane", job_id="j7")
    log.info("before")
    with t.job_span(tel.tracer, "j7", "react") as job:
        log.info("segment admitted", queue_level=1)
        logging.getLogger("astraea.predictor").warning("predictor slow: %d ms", 250)
    log.debug("after")
    before, inside, stdlib, after = _lines(log_stream)
    ctx = job.get_span_context()
    assert inside == {**inside, "event": "segment admitted", "level": "info",
                      "logger": "astraea.control_plane", "job_id": "j7", "queue_level": 1,
                      "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}
    assert "timestamp" in inside
    assert stdlib["event"] == "predictor slow: 250 ms"
    assert (stdlib["logger"], stdlib["level"]) == ("astraea.predictor", "warning")
    assert stdlib["trace_id"] == inside["trace_id"]
    for line in (before, after):
        assert line["job_id"] == "j7" and "trace_id" not in line and "span_id" not in line


def test_log_level_filters(log_stream):
    t.configure_logging("warning", stream=log_stream, capture_stdlib=False)
    log = t.get_logger("x")
    log.info("dropped")
    log.error("kept")
    assert [line["event"] for line in _lines(log_stream)] == ["kept"]


# -- metrics -------------------------------------------------------------------------------------

def _points(reader) -> dict[str, list]:
    out: dict[str, list] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


def test_metrics_histograms_counter_and_gauges(tel):
    m = tel.metrics
    queue_calls = []

    def queues():
        queue_calls.append(1)
        return {0: 4, 1: 2, 2: 0}

    m.set_queue_length_source(queues)
    m.set_kv_utilization_source(lambda: {0: 0.25, 1: 0.9})
    m.record_jct(12.5, policy="astraea", category="react")
    m.record_jct(3.0, policy="astraea", category="react")
    m.record_jct(40.0, policy="vllm-fcfs", category="react")
    m.record_decision_latency(0.4, kind="kv_decision")
    with m.time_decision("build_plan"):
        pass
    m.predictor_fallback("timeout")
    m.predictor_fallback("timeout")
    with pytest.raises(ValueError, match="decision kind"):
        m.record_decision_latency(1.0, kind="other")

    pts = _points(tel.reader)
    jct = {(p.attributes["policy"], p.attributes["category"]): p for p in pts["astraea.job.jct"]}
    assert (jct["astraea", "react"].count, jct["astraea", "react"].sum) == (2, 15.5)
    assert jct["vllm-fcfs", "react"].count == 1
    lat = {p.attributes["kind"]: p for p in pts["astraea.decision.latency"]}
    assert lat["kv_decision"].sum == 0.4 and lat["build_plan"].count == 1
    assert 0.05 in lat["kv_decision"].explicit_bounds  # sub-millisecond buckets
    (fb,) = pts["astraea.predictor.fallbacks"]
    assert (fb.value, dict(fb.attributes)) == (2, {"reason": "timeout"})
    assert queue_calls
    assert {p.attributes["level"]: p.value for p in pts["astraea.queue.length"]} == {
        0: 4, 1: 2, 2: 0}
    assert {p.attributes["worker_id"]: p.value for p in pts["astraea.kv.utilization"]} == {
        "0": 0.25, "1": 0.9}


def test_gauges_without_a_source_report_nothing(tel):
    assert "astraea.queue.length" not in _points(tel.reader)


# -- OTLP without a collector --------------------------------------------------------------------

def test_otlp_setup_builds_and_shuts_down_fast_with_no_collector():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = t.TelemetryConfig("astraea-test", otlp_endpoint=f"http://127.0.0.1:{port}",
                            export_timeout_s=0.2)
    tel = t.setup_telemetry(cfg)
    assert [type(p) for p in tel.span_processors] == [BatchSpanProcessor]
    assert [type(r) for r in tel.metric_readers] == [PeriodicExportingMetricReader]
    with t.job_span(tel.tracer, "j", "x"):
        pass
    tel.metrics.record_jct(1.0, policy="p", category="c")
    t0 = time.monotonic()
    tel.shutdown()
    tel.shutdown()  # idempotent
    assert time.monotonic() - t0 < 2.0


def test_console_exporter_prints_spans(capsys):
    tel = t.setup_telemetry(t.TelemetryConfig("astraea-test", console=True))
    assert [type(p) for p in tel.span_processors] == [SimpleSpanProcessor]
    assert tel.metric_readers == ()
    with t.job_span(tel.tracer, "j-console", "x"):
        pass
    tel.shutdown()
    assert '"astraea.job_id": "j-console"' in capsys.readouterr().out


def test_spans_are_recorded_only_while_something_receives_them():
    """With no destination (no OTLP endpoint, console or span dir) spans are not recorded:
    they cost next to nothing but keep a trace id for logs and propagation. A processor added
    later (a test's in-memory exporter) turns recording on."""
    tele = t.setup_telemetry(t.TelemetryConfig("astraea-test"))
    try:
        with tele.tracer.start_as_current_span("unseen") as span:
            assert not span.is_recording()
            assert span.get_span_context().is_valid
        exporter = InMemorySpanExporter()
        tele.add_span_exporter(exporter)
        with tele.tracer.start_as_current_span("seen") as span:
            assert span.is_recording()
        assert [x.name for x in exporter.get_finished_spans()] == ["seen"]
    finally:
        tele.shutdown()
