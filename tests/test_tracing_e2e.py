"""One job, one trace: a replayed agent trace through a predictor, a
control plane and two simulated workers over real gRPC on loopback, every service exporting to
the SDK's in-memory exporter; then the spans of each job are checked as a user reading the
trace would rely on them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from astraea.profile import load_profile
from astraea.telemetry import TelemetryConfig, setup_telemetry, spans
from astraea.tools.replay import AGENT_SPAN, replay, replay_jobs
from control_plane.service.context import ServiceConfig
from control_plane.service.predictor_link import OBSERVE_SPAN
from control_plane.service.server import serve
from predictor_svc.server import serve as serve_predictor
from worker.process import ADMISSION_SPAN, run_worker
from worker.sim.backend import SimulatedBackend

TIME_SCALE = 0.002
PROFILE = "gptj-6b-a100"
KV_ACTIONS = {"preserve", "swap", "discard"}


def _telemetry(name: str, exporter: InMemorySpanExporter):
    tel = setup_telemetry(TelemetryConfig(name), configure_logs=False)
    tel.add_span_exporter(exporter)
    return tel


async def _traced_run(jobs, kv_blocks=None):
    exporter = InMemorySpanExporter()
    tels = {n: _telemetry(n, exporter) for n in ("predictor", "control-plane", "worker", "client")}
    predictor = serve_predictor("127.0.0.1:0", PROFILE, tracer=tels["predictor"].tracer)
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=TIME_SCALE),
                         predictor=f"127.0.0.1:{predictor.port}",
                         tracer=tels["control-plane"].tracer, metrics=tels["control-plane"].metrics)
    address = f"127.0.0.1:{server.port}"
    prof = load_profile(PROFILE)
    workers = [asyncio.create_task(run_worker(
        address, SimulatedBackend(prof, time_scale=TIME_SCALE, kv_blocks=kv_blocks), f"w{i}",
        tracer=tels["worker"].tracer)) for i in range(2)]
    try:
        while len(server.control_plane.registry.workers) < 2:
            await asyncio.sleep(0.01)
        result = await replay(jobs, address, prof, TIME_SCALE, log=open("/dev/null", "w"),
                              tracer=tels["client"].tracer)
        # The link sends observations every 0.1 s: wait for the batch of the last API waits.
        for _ in range(100):
            if server.predictor_link.sent and not server.predictor_link._pending():
                break
            await asyncio.sleep(0.05)
    finally:
        await server.stop(grace=0.5)
        for t in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(t, 5)
        predictor.stop(0)
    for tel in tels.values():
        tel.force_flush()
    return result, exporter.get_finished_spans(), server


@pytest.fixture(scope="module")
def traced():
    prof = load_profile(PROFILE)
    jobs, _ = replay_jobs("infercept", 10, 4.0, 3, prof.context_window)
    result, finished, server = asyncio.run(_traced_run(jobs))
    return jobs, result, finished, server


def _by_job(finished):
    out = defaultdict(list)
    for s in finished:
        job_id = s.attributes.get(spans.JOB_ID)
        if job_id is not None:
            out[job_id].append(s)
    return out


def test_every_job_is_one_trace_rooted_at_the_client(traced):
    jobs, result, finished, _ = traced
    assert not result.errors
    by_job = _by_job(finished)
    for job in jobs:
        mine = by_job[job.job_id]
        names = [s.name for s in mine]
        assert names.count(AGENT_SPAN) == 1 and names.count(spans.JOB) == 1, names
        assert len({s.context.trace_id for s in mine}) == 1, f"{job.job_id}: several traces"
        agent = next(s for s in mine if s.name == AGENT_SPAN)
        job_span = next(s for s in mine if s.name == spans.JOB)
        assert agent.parent is None
        # The control plane's root continues the client's span (propagated over gRPC).
        assert job_span.parent.span_id == agent.context.span_id
        assert job_span.resource.attributes["service.name"] == "control-plane"


def test_segment_and_api_wait_spans_carry_what_the_design_names(traced):
    jobs, _, finished, _ = traced
    by_job = _by_job(finished)
    for job in jobs:
        mine = by_job[job.job_id]
        job_span = next(s for s in mine if s.name == spans.JOB)
        segs = sorted((s for s in mine if s.name == spans.SEGMENT),
                      key=lambda s: s.attributes[spans.SEGMENT_INDEX])
        waits = sorted((s for s in mine if s.name == spans.API_WAIT), key=lambda s: s.start_time)
        assert [s.attributes[spans.SEGMENT_INDEX] for s in segs] == list(range(len(job.segments)))
        assert len(waits) == sum(1 for seg in job.segments if seg.tool is not None)
        for s, seg in zip(segs, job.segments):
            assert s.parent.span_id == job_span.context.span_id
            assert s.attributes[spans.TOKENS] == seg.output_tokens
            assert s.attributes[spans.TTFT_S] >= 0
            assert s.attributes[spans.QUEUE_LEVEL] >= 0
            assert s.attributes[spans.HRRN_SCORE] >= 1.0  # (W + T) / T
            assert s.attributes[spans.WORKER_ID] in (0, 1)
        tools = [seg.tool for seg in job.segments if seg.tool is not None]
        for w, tool, before, after in zip(waits, tools, segs, segs[1:]):
            assert w.parent.span_id == job_span.context.span_id
            # The wait sits between the segment that called the tool and the next one.
            assert before.end_time <= w.start_time and w.end_time <= after.start_time
            assert w.attributes[spans.TOOL_CATEGORY] == tool.category
            assert w.attributes[spans.KV_ACTION] in KV_ACTIONS
            assert w.attributes[spans.KV_REASON]
            assert w.attributes[spans.API_PREDICTED_S] > 0
            # Observed on the control plane's clock, in virtual seconds: at least the tool's
            # sleep, and the span's own length (at this time scale, transport and the event
            # loop add whole virtual seconds to the sleep).
            observed = w.attributes[spans.API_OBSERVED_S]
            assert observed >= tool.duration_s * 0.99
            wall_s = (w.end_time - w.start_time) / 1e9
            # (10 ms of wall-clock slack between the two clock reads, for a loaded machine)
            assert observed == pytest.approx(wall_s / TIME_SCALE, rel=0.05, abs=0.01 / TIME_SCALE)
            assert any(e.name == spans.KV_DECISION_EVENT for e in w.events)
        assert job_span.attributes[spans.JCT_S] > 0
        assert job_span.attributes[spans.FINAL_QUEUE] >= 0
        assert job_span.attributes[spans.CATEGORY] == job.category


def test_worker_admissions_are_children_of_their_segments(traced):
    jobs, _, finished, _ = traced
    by_job = _by_job(finished)
    for job in jobs:
        mine = by_job[job.job_id]
        segs = {s.context.span_id: s for s in mine if s.name == spans.SEGMENT}
        admissions = [s for s in mine if s.name == ADMISSION_SPAN]
        assert len(admissions) >= len(segs)
        assert {a.resource.attributes["service.name"] for a in admissions} == {"worker"}
        for a in admissions:
            seg = segs[a.parent.span_id]
            assert a.attributes[spans.WORKER_ID] == seg.attributes[spans.WORKER_ID]
        ended = [a for a in admissions if a.attributes["astraea.end_reason"] == "segment ended"]
        assert sorted(a.attributes[spans.TOKENS] for a in ended) == sorted(
            seg.output_tokens for seg in job.segments)


def test_predictor_calls_link_to_the_api_waits_they_report(traced):
    _, _, finished, _ = traced
    waits = {s.context.span_id for s in finished if s.name == spans.API_WAIT}
    observes = [s for s in finished if s.name == OBSERVE_SPAN]
    linked = {link.context.span_id for s in observes for link in s.links}
    assert linked and linked <= waits
    # The predictor's server span continues the control plane's call (propagated context).
    server_spans = [s for s in finished if s.name == "Observe"]
    observe_ids = {s.context.span_id for s in observes}
    assert server_spans and all(s.parent.span_id in observe_ids for s in server_spans)
    assert {s.resource.attributes["service.name"] for s in server_spans} == {"predictor"}


def test_build_batch_spans_record_queues_and_decisions(traced):
    jobs, _, finished, _ = traced
    batches = [s for s in finished if s.name == spans.BUILD_BATCH]
    assert batches and all(s.parent is None for s in batches)  # traces of their own
    admitted = sum(s.attributes.get(spans.PLAN_PREFIX + "admit", 0) for s in batches)
    assert admitted >= sum(len(j.segments) for j in jobs)
    for s in batches:
        assert all(n >= 0 for n in s.attributes[spans.QUEUE_LENGTHS])
        assert s.attributes[spans.PLAN_ACTIONS] == sum(
            v for k, v in s.attributes.items()
            if k.startswith(spans.PLAN_PREFIX) and k.rsplit(".", 1)[1] in
            ("admit", "pause", "evict", "preempt"))


def test_no_span_is_left_open(traced):
    _, _, _, server = traced
    assert server.control_plane.tracing.open_jobs() == 0
