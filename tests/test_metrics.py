"""GET /metrics (Prometheus text format) on every service: the services run as real processes
with --metrics-port, a job goes through them, and the scrapes are parsed with
prometheus_client's own parser. The worker's vLLM names are checked as exact strings: the
Inference Extension's endpoint picker and vLLM dashboards look for nothing else."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from astraea.plan import Admit, KvAction, Pause
from astraea.profile import load_profile
from astraea.telemetry import prometheus
from astraea.telemetry.worker_metrics import MeteredBackend
from astraea.v1 import agent_pb2, agent_pb2_grpc
from worker.backend import SegmentEnded, SegmentInput
from worker.sim.backend import SimulatedBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
               "vllm:gpu_cache_usage_perc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(module: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "ASTRAEA_"))}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def scrape(port: int) -> dict[str, list]:
    """Family name (as the parser gives it: counters without `_total`) → its samples."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    """The sum of `family`'s samples named `sample` (default: the family) whose labels
    include `labels`."""
    name = sample or family
    return sum(s.value for s in families.get(family, [])
               if s.name == name and labels.items() <= s.labels.items())


def wait_scrape(port: int, ready, timeout: float = 60.0) -> dict:
    """Scrape until `ready(families)` holds (the services run at their own pace)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fams = scrape(port)
            if ready(fams):
                return fams
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"metrics on :{port} never became ready"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tiny_folder():
    from worker.vllm.tiny_model import resolve_model

    return resolve_model(None)


def test_every_service_serves_its_metrics_while_a_job_runs_through(tiny_folder):
    pred_port, cp_port, gw_port = _free_port(), _free_port(), _free_port()
    m = {name: _free_port() for name in ("predictor", "cp", "worker", "gateway")}
    procs = [_start("predictor_svc.server", "--listen", f"127.0.0.1:{pred_port}", "--grace",
                    "0.2", "--metrics-port", str(m["predictor"]))]
    try:
        procs.append(_start("control_plane.service.server", "--listen",
                            f"127.0.0.1:{cp_port}", "--grace", "0.2", "--time-scale", "0.01",
                            "--predictor", f"127.0.0.1:{pred_port}",
                            "--metrics-port", str(m["cp"])))
        procs.append(_start("worker.process", "--control-plane", f"127.0.0.1:{cp_port}",
                            "--time-scale", "0.01", "--name", "w1",
                            "--metrics-port", str(m["worker"])))
        procs.append(_start("gateway.server", "--listen", f"127.0.0.1:{gw_port}",
                            "--control-plane", f"127.0.0.1:{cp_port}", "--model", "m",
                            "--tokenizer", tiny_folder, "--session-idle-s", "0.5",
                            "--metrics-port", str(m["gateway"])))
        # The worker registered: its Connect stream is open, its gauges report.
        wait_scrape(m["worker"], lambda f: "vllm:num_requests_running" in f)
        wait_scrape(m["cp"], lambda f: value(f, "astraea_kv_utilization") >= 0
                    and any(s.labels.get("worker_id")
                            for s in f.get("astraea_kv_utilization", [])))
        wait_scrape(m["gateway"], lambda f: "astraea_http_requests" in f)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="none",
                           max_retries=3, timeout=60) as client:
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert reply.choices[0].message is not None
        # A bad request, answered by the control plane itself.
        with grpc.insecure_channel(f"127.0.0.1:{cp_port}") as ch, \
                pytest.raises(grpc.RpcError) as bad:
            agent_pb2_grpc.AgentServiceStub(ch).GetJob(
                agent_pb2.GetJobRequest(job_id="no-such-job"), timeout=10)
        bad_code = bad.value.code().name

        # The gateway's session ends after 0.5 s idle: the job finishes, its JCT is recorded.
        cp = wait_scrape(m["cp"], lambda f: value(
            f, "astraea_job_jct_seconds", "astraea_job_jct_seconds_count") >= 1
            and value(f, "astraea_jobs_in_flight") == 0)
        agent = "/astraea.v1.AgentService/"
        assert value(cp, "astraea_rpc_requests", "astraea_rpc_requests_total",
                     method=agent + "StartJob", code="OK") >= 1
        assert value(cp, "astraea_rpc_requests", "astraea_rpc_requests_total",
                     method=agent + "GetJob", code=bad_code) == 1
        assert value(cp, "astraea_rpc_duration_seconds", "astraea_rpc_duration_seconds_count",
                     method=agent + "StartJob") >= 1
        # A server-streaming call counts once, at its end.
        assert value(cp, "astraea_rpc_requests", "astraea_rpc_requests_total",
                     method=agent + "RunSegment", code="OK") >= 1
        assert value(cp, "process_resident_memory_bytes") > 0
        assert {s.labels["level"] for s in cp["astraea_queue_length"]} >= {"0"}
        assert value(cp, "astraea_decision_latency_seconds",
                     "astraea_decision_latency_seconds_count", kind="build_plan") >= 1
        assert 0 <= value(cp, "astraea_kv_utilization") <= 1
        # The chat turn's end is an API wait (the session may send another): one KV decision.
        assert value(cp, "astraea_kv_decisions", "astraea_kv_decisions_total",
                     cause="api_wait") >= 1
        assert {s.labels["action"] for s in cp["astraea_kv_decisions"]} <= {
            "preserve", "swap", "discard"}

        worker = wait_scrape(m["worker"],
                             lambda f: value(f, "vllm:num_requests_running") == 0
                             and value(f, "astraea_worker_kv_actions",
                                       "astraea_worker_kv_actions_total") >= 1)
        for name in VLLM_GAUGES:
            assert worker[name][0].labels["model_name"], name
        assert 0 <= value(worker, "vllm:gpu_cache_usage_perc") <= 1
        assert value(worker, "vllm:num_requests_waiting") == 0
        kinds = {s.labels["kind"] for s in worker["astraea_worker_kv_actions"]}
        assert kinds == {"preserve", "swap", "discard"}
        # The exact strings, as a scraper matching names would see them.
        text = httpx.get(f"http://127.0.0.1:{m['worker']}/metrics", timeout=5).text
        for name in (*VLLM_GAUGES, "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                     "astraea_worker_swap_bytes_total", "astraea_worker_preemptions_total"):
            assert f"\n{name}{{" in text or f"\n{name} " in text, name

        pred = scrape(m["predictor"])
        assert value(pred, "astraea_rpc_requests", "astraea_rpc_requests_total",
                     code="OK") >= 1
        assert all(s.labels["method"].startswith("/astraea.v1.PredictorService/")
                   for s in pred["astraea_rpc_requests"] if s.name.endswith("_total"))

        gw = scrape(m["gateway"])
        assert value(gw, "astraea_http_requests", "astraea_http_requests_total",
                     route="/v1/chat/completions", status="200", method="POST") == 1
        assert value(gw, "astraea_http_request_duration_seconds",
                     "astraea_http_request_duration_seconds_count",
                     route="/v1/chat/completions") == 1
        # Only the routes' templates are labels: an unknown path cannot grow the series.
        httpx.get(f"http://127.0.0.1:{gw_port}/no/such/path/123", timeout=5)
        gw = scrape(m["gateway"])
        assert value(gw, "astraea_http_requests", "astraea_http_requests_total",
                     route="unmatched", status="404") == 1
        assert not any("/no/such" in s.labels.get("route", "")
                       for s in gw["astraea_http_requests"])

        # The Grafana dashboard asks only for families some service serves.
        served = set().union(*(scrape(port) for port in m.values()))
        dashboard = (Path(ROOT) / "docker" / "grafana" / "astraea.json").read_text()
        asked = {re.sub(r"_(total|bucket|count|sum)$", "", name)
                 for name in re.findall(r"\b(?:astraea_[a-z_]+|vllm:[a-z_]+)", dashboard)}
        assert asked and asked <= served, asked - served
    finally:
        codes = [_stop(p) for p in reversed(procs)]
    assert codes == [0] * len(procs)


def test_metrics_are_off_without_a_port_and_flags_beat_the_environment():
    ns = argparse.Namespace
    assert prometheus.endpoint_from_args(ns(), {}) is None
    assert prometheus.endpoint_from_args(ns(metrics_port=0, metrics_host=None),
                                         {"ASTRAEA_METRICS_PORT": "9100"}) is None
    assert prometheus.endpoint_from_args(ns(), {"ASTRAEA_METRICS_PORT": "9100"}) == \
        prometheus.MetricsEndpoint("127.0.0.1", 9100)
    assert prometheus.endpoint_from_args(
        ns(metrics_port=9200, metrics_host="0.0.0.0"), {"ASTRAEA_METRICS_HOST": "::1"}) == \
        prometheus.MetricsEndpoint("0.0.0.0", 9200)
    with pytest.raises(prometheus.MetricsConfigError, match="ASTRAEA_METRICS_PORT='x'"):
        prometheus.endpoint_from_args(ns(), {"ASTRAEA_METRICS_PORT": "x"})
    with pytest.raises(prometheus.MetricsConfigError, match="--metrics-port 70000"):
        prometheus.endpoint_from_args(ns(metrics_port=70000), {})


def test_a_bad_or_taken_metrics_port_stops_the_service_with_a_message():
    out = subprocess.run([sys.executable, "-m", "worker.process", "--metrics-port", "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--metrics-port -1: must be 0 (off) to 65535" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "control_plane.service.server",
                              "--listen", "127.0.0.1:0", "--metrics-port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr


def test_metered_backend_counts_kv_actions_and_swap_bytes():
    """A swap-out and its swap-in, on the simulated engine: bytes = blocks × block size."""
    async def main() -> None:
        profile = load_profile("gptj-6b-a100")
        registry = CollectorRegistry()
        backend = MeteredBackend(SimulatedBackend(profile, time_scale=0.001), registry)
        await backend.start()
        events = backend.events()
        try:
            await backend.apply(Admit("j", 0, new_tokens=100, context_tokens=0),
                                SegmentInput(max_tokens=4))
            async for ev in events:
                if isinstance(ev, SegmentEnded):
                    break
            await backend.apply(Pause("j", 0, KvAction.SWAP))
            block_bytes = profile.kv_bytes_per_token * profile.block_size
            held = -(-104 // profile.block_size)  # 100 prompt + 4 generated tokens
            get = registry.get_sample_value
            assert get("astraea_worker_kv_actions_total", {"kind": "swap"}) == 1
            assert get("astraea_worker_swap_bytes_total", {"direction": "out"}) == \
                held * block_bytes
            await asyncio.sleep(0.05)  # the copy lands
            await backend.apply(Admit("j", 0, new_tokens=10, context_tokens=104, swap_in=True),
                                SegmentInput(max_tokens=2, first_index=0))
            assert get("astraea_worker_swap_bytes_total", {"direction": "in"}) == \
                held * block_bytes
            running = get("vllm:num_requests_running", {"model_name": profile.model})
            assert running == 1
            assert 0 < get("vllm:gpu_cache_usage_perc", {"model_name": profile.model}) <= 1
        finally:
            await backend.stop()
    asyncio.run(main())


def test_rpc_interceptors_label_every_outcome_with_its_status():
    """Over real gRPC servers (aio and thread-pool) running the standard health service: a
    call that succeeds, one the servicer refuses, and a stream the client cancels."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer as AioHealthServicer

    check, watch = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"

    def calls(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            next(stream)  # the first status, then the client goes away
            stream.cancel()

    def outcomes(registry: CollectorRegistry) -> dict:
        deadline = time.monotonic() + 10
        while True:  # the server notices the cancelled stream a moment later
            got = {(s.labels["method"], s.labels["code"]): s.value
                   for f in registry.collect() if f.name == "astraea_rpc_requests"
                   for s in f.samples if s.name.endswith("_total")}
            if (watch, "CANCELLED") in got or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    expected = {(check, "OK"): 1, (check, "NOT_FOUND"): 1, (watch, "CANCELLED"): 1}

    # Thread-pool server (the predictor's kind).
    registry = CollectorRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[
        prometheus.RpcInterceptor(prometheus.RpcMetrics(registry))])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        calls(port)
        assert outcomes(registry) == expected
    finally:
        server.stop(0)

    # asyncio server (the control plane's kind).
    async def aio() -> None:
        registry = CollectorRegistry()
        server = grpc.aio.server(interceptors=[
            prometheus.AioRpcInterceptor(prometheus.RpcMetrics(registry))])
        servicer = AioHealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.to_thread(calls, port)
            assert await asyncio.to_thread(outcomes, registry) == expected
        finally:
            await server.stop(0)
    asyncio.run(aio())


def test_decision_count_keys_and_metric_labels_convert_both_ways():
    from astraea.plan import decision_key, decision_labels

    pairs = {"swap": ("swap", "api_wait"), "reclaim_discard": ("discard", "reclaim"),
             "preempt_swap": ("swap", "preemption")}
    for key, labels in pairs.items():
        assert decision_labels(key) == labels
        assert decision_key(*labels) == key
    with pytest.raises(ValueError, match="unknown KV decision cause 'later'"):
        decision_key("swap", "later")
