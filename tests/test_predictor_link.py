"""The control plane's predictor link over real gRPC on loopback: observations reach the
predictor, its estimates are used, and a slow, stopped or absent predictor never blocks the
estimator calls (local estimates, one fallback count per failed call, recovery)."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from astraea import telemetry as t
from astraea.plan import JobState
from astraea.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from control_plane.core.job import Job
from control_plane.service.predictor_link import PredictorLink
from control_plane.service.server import serve as serve_control_plane
from predictor_svc.server import serve as serve_predictor

PROFILE = "gptj-6b-a100"
FAST = dict(timeout_s=0.2, flush_interval_s=0.02, refresh_interval_s=0.05, retry_interval_s=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics():
    reader = InMemoryMetricReader()
    tel = t.setup_telemetry(t.TelemetryConfig("astraea-test"), metric_readers=[reader])
    return tel, reader


def _fallbacks(reader) -> dict[str, int]:
    out: dict[str, int] = {}
    data = reader.get_metrics_data()
    for rm in (data.resource_metrics if data else []):
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "astraea.predictor.fallbacks":
                    for p in m.data.data_points:
                        out[p.attributes["reason"]] = p.value
    return out


def _job(category: str = "chat", tool: str = "search") -> Job:
    return Job("j1", 0.0, category=category, state=JobState.API_WAIT, next_tool_category=tool)


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _remote_api_mean(server, category: str) -> float:
    resp = server.predictor.estimate(predictor_pb2.EstimateBatchRequest(
        requests=[predictor_pb2.EstimateRequest(job_id="x", category=category)]))
    return resp.estimates[0].api_total_s


def test_observations_reach_the_predictor_and_its_estimates_are_used():
    async def main() -> None:
        pred = serve_predictor("127.0.0.1:0", PROFILE)
        tel, reader = _metrics()
        link = PredictorLink(f"127.0.0.1:{pred.port}", metrics=tel.metrics, **FAST)
        try:
            # The predictor knows more than this control plane: long searches seen elsewhere.
            pred.predictor.observe(predictor_pb2.ObserveRequest(api_calls=[
                predictor_pb2.ApiObservation(category="search", duration_s=9.0)] * 10))
            await link.start()
            job = _job()
            for _ in range(10):
                link.observe_api("search", 1.0)
                link.observe_output(job, 100)
            link.observe_steps([common_pb2.StepTiming(tokens=8 + i, context_tokens_read=100 * i,
                                                      duration_s=0.02) for i in range(10)]
                               + [common_pb2.StepTiming(tokens=0, duration_s=0.01)])  # invalid
            await _until(lambda: link.sent >= 30)
            assert link.sent == 30  # the invalid step was dropped locally, the batch accepted
            assert _remote_api_mean(pred, "search") == (10 * 9.0 + 10 * 1.0) / 20
            assert len(pred.predictor.snapshot().step_timings) == 10
            assert link.local.api_mean_s("search") == 1.0
            # Once refreshed, the remote estimates are served (the local ones differ).
            await _until(lambda: link.api_duration_s(job) == 5.0)
            assert link.output_tokens(job) == 100.0
            assert link.up is True
            assert _fallbacks(reader) == {}
        finally:
            await link.close()
            pred.stop(0)
            tel.shutdown()

    asyncio.run(main())


def test_a_predictor_that_knows_no_more_than_the_control_plane_is_not_asked_to_answer():
    """One control plane and a fresh predictor: the predictor hears of each observation late
    and is asked now and then, so its estimates trail the local ones (at 5x real time, by
    seconds of engine time). The local estimator, which has seen at least as much, answers."""
    async def main() -> None:
        pred = serve_predictor("127.0.0.1:0", PROFILE)
        link = PredictorLink(f"127.0.0.1:{pred.port}", **FAST)
        try:
            await link.start()
            job = _job()
            for _ in range(10):
                link.observe_api("search", 1.0)
            await _until(lambda: link.sent >= 10)
            seen = link.refreshes
            await _until(lambda: link.refreshes >= seen + 2)  # one refresh after the flush
            assert _remote_api_mean(pred, "search") == 1.0
            for _ in range(10):  # new observations, not yet at the predictor
                link.observe_api("search", 3.0)
            assert link.api_duration_s(job) == link.local.api_mean_s("search") == 2.0
        finally:
            await link.close()
            pred.stop(0)

    asyncio.run(main())


def test_nobody_listening_answers_locally_without_blocking_and_counts_fallbacks():
    async def main() -> None:
        tel, reader = _metrics()
        link = PredictorLink(f"127.0.0.1:{_free_port()}", metrics=tel.metrics, **FAST)
        await link.start()
        try:
            job = _job()
            for _ in range(10):
                assert _timed(link.observe_api, "search", 2.0) < 0.05
            await _until(lambda: link.failures >= 2)
            assert link.up is False
            assert _timed(link.api_duration_s, job) < 0.05
            assert link.api_duration_s(job) == 2.0  # local
            assert _timed(link.remaining_api_s, job, 0.5) < 0.05
            assert _timed(link.output_tokens, job) < 0.05
            assert _fallbacks(reader).get("unavailable", 0) >= 2
        finally:
            await link.close()
            tel.shutdown()

    asyncio.run(main())


class _SlowPredictor(predictor_pb2_grpc.PredictorServiceServicer):
    async def Estimate(self, request, context):
        await asyncio.sleep(1.0)
        return predictor_pb2.EstimateBatchResponse()

    async def Observe(self, request, context):
        await asyncio.sleep(1.0)
        return predictor_pb2.ObserveResponse()


def test_slow_predictor_times_out_and_falls_back():
    async def main() -> None:
        server = grpc.aio.server()
        predictor_pb2_grpc.add_PredictorServiceServicer_to_server(_SlowPredictor(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        tel, reader = _metrics()
        link = PredictorLink(f"127.0.0.1:{port}", metrics=tel.metrics,
                             **{**FAST, "timeout_s": 0.05})
        await link.start()
        try:
            link.observe_api("search", 3.0)
            await _until(lambda: link.failures >= 1)
            assert link.up is False
            assert _timed(link.api_duration_s, _job()) < 0.05
            assert link.api_duration_s(_job()) == 3.0
            assert _fallbacks(reader).get("timeout", 0) >= 1
        finally:
            await link.close()
            await server.stop(0)
            tel.shutdown()

    asyncio.run(main())


def test_predictor_stopped_then_restarted_recovers(caplog):
    async def main() -> None:
        port = _free_port()
        address = f"127.0.0.1:{port}"
        pred = serve_predictor(address, PROFILE)
        tel, reader = _metrics()
        link = PredictorLink(address, metrics=tel.metrics, **FAST)
        await link.start()
        try:
            link.observe_api("search", 1.0)
            await _until(lambda: link.up is True and link.sent == 1)
            pred.stop(0).wait()
            await _until(lambda: link.up is False)
            # Down: local answers, promptly; observations are kept for later.
            for _ in range(20):
                assert _timed(link.observe_api, "search", 4.0) < 0.05
            assert _timed(link.api_duration_s, _job()) < 0.05
            assert _fallbacks(reader).get("unavailable", 0) >= 1
            failures = link.failures
            await _until(lambda: link.failures > failures)  # still retrying
            pred = serve_predictor(address, PROFILE)  # back, with a fresh state
            await _until(lambda: link.up is True and link.sent >= 21)
            await _until(lambda: _remote_api_mean(pred, "search") == 4.0)
            await _until(lambda: link.refreshes > 0 and link._fresh())
        finally:
            await link.close()
            pred.stop(0)
            tel.shutdown()

    asyncio.run(main())


async def _health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=2)).status


def test_control_plane_uses_the_link_and_serves_health():
    async def main() -> None:
        pred = serve_predictor("127.0.0.1:0", PROFILE)
        tel, _ = _metrics()
        server = await serve_control_plane("127.0.0.1:0", "astraea", PROFILE,
                                           predictor=f"127.0.0.1:{pred.port}",
                                           metrics=tel.metrics)
        try:
            link = server.predictor_link
            # The link answers every estimate the client's own hints do not.
            assert server.control_plane.scheduler.estimator.inner is link
            assert server.control_plane.step_observer is link
            server.control_plane.observe_steps([common_pb2.StepTiming(
                tokens=4, context_tokens_read=10, duration_s=0.01)])
            await _until(lambda: link.sent == 1)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await _health(server.port) == serving
            assert await _health(server.port, "astraea.v1.AgentService") == serving
            await server.health.enter_graceful_shutdown()
            assert await _health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop(grace=0.2)
            pred.stop(0)
            tel.shutdown()
        assert server.predictor_link._task is None  # closed by stop()

    asyncio.run(main())


def test_predictor_serves_health_and_reports_not_serving_on_drain():
    pred = serve_predictor("127.0.0.1:0", PROFILE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{pred.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "astraea.v1.PredictorService"):
                assert stub.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=2).status == health_pb2.HealthCheckResponse.SERVING
            pred.health.enter_graceful_shutdown()  # what main does on SIGTERM
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        pred.stop(0)
