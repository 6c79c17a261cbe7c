"""`astraea bench-soak`: a short soak of a few hundred jobs whose report must say every job
completed, with sane memory figures and the documented JSON shape. Speed is not asserted (it
belongs to the benchmark, not to a timed test)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import grpc
import pytest

from astraea.tools.bench.soak import SoakConfig, rss_bytes
from astraea.tools.cli.main import main
from control_plane.service.limits import UNTAKEN_CALL_TIMEOUT_S, Limits


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    # The services inherit the environment: no OTLP exports or console spans from tests.
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_short_soak_completes_every_job_and_reports_memory_and_floor(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = main(["bench-soak", "--jobs", "200", "--minutes", "0.2", "--warmup", "2",
                 "--interval", "4", "--floor-seconds", "3", "--floor-warmup", "1",
                 "--segments-per-job", "3", "--tool-ms", "1",
                 "--log-dir", str(tmp_path / "logs"), "--json", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert code == 0, (r["errors"], r["error_examples"], r["jobs_not_drained"])
    assert "ALL JOBS COMPLETED" in printed and "control-plane RSS MB" in printed

    # Every job that started ended, on the client and on the control plane's own counts.
    assert r["all_jobs_completed"] is True
    assert r["failures"] == 0 and r["errors"] == {} and r["bad_token_segments"] == 0
    assert r["jobs_not_drained"] == 0
    assert r["jobs_started"] >= 200  # the first 200, then successors during the window
    assert r["jobs_started"] == r["jobs_completed"]
    assert r["control_plane_jobs"] == {"started": r["jobs_started"], "ended": r["jobs_started"]}
    assert all(c == 0 for c in r["exit_codes"].values()), r["exit_codes"]

    # Rates and latencies over the window, from the window's own counts.
    assert r["segments"] > 0
    assert r["segments_per_s"] == pytest.approx(r["segments"] / r["window_s"])
    assert r["control_plane_events"] == sum(r["control_plane_events_by_kind"].values())
    assert r["control_plane_events_by_kind"]["run_segment"] > 0
    pl = r["plan_latency"]
    assert pl["count"] > 0 and 0 <= pl["p50_ms"] <= pl["p99_ms"] <= pl["max_ms"]
    assert r["control_plane_cpu_ms_per_segment"] > 0
    assert 0 < r["build_plan_mean_ms"] <= pl["max_ms"]  # part of the plan latency
    assert len(r["timeline"]) >= 2  # 12 s read every 4 s
    assert sum(t["segments"] > 0 for t in r["timeline"]) == len(r["timeline"])

    # The control plane's resident set: read at every point, a Python process's size, and
    # the peak is the largest reading.
    mem = r["rss_mb"]
    points = ("idle", "after_warmup", "end_of_window", "after_drain")
    assert all(20 < mem[k] < 4096 for k in points), mem
    assert mem["peak"] >= max(mem[k] for k in points[1:]) - 1e-9
    assert mem["second_half_change"] is not None
    assert all(t["rss_mb"] > 0 for t in r["timeline"])

    # The floor ran under the same load and the ratio is the two runs' segments/s.
    assert r["floor"]["segments_per_s"] > 0 and r["floor"]["errors"] == {}
    assert r["floor_ratio"] == pytest.approx(r["segments_per_s"] / r["floor"]["segments_per_s"])
    assert "soak / floor segments/s" in printed


def test_admission_is_sized_above_the_jobs_in_flight():
    # 5,000 concurrent jobs exceed the control plane's default bound: the soak raises it,
    # so none is refused (a refusal would count as a failure).
    assert SoakConfig(jobs=5000).max_unfinished_jobs() > 5000 > Limits().max_unfinished_jobs
    assert SoakConfig(jobs=10).max_unfinished_jobs() == Limits().max_unfinished_jobs


def test_rss_of_a_live_and_a_gone_process():
    assert rss_bytes(os.getpid()) > 1 << 20
    assert rss_bytes(2 ** 22 + 12345) is None  # above Linux's pid_max default


@pytest.mark.parametrize("flags", [["--minutes", "0"], ["--interval", "-1"],
                                   ["--jobs", "0"], ["--floor-seconds", "-1"]])
def test_bad_flags_are_refused_in_one_line(flags, capsys):
    assert main(["bench-soak", *flags]) == 2
    assert "astraea: error:" in capsys.readouterr().err


def _call_while_the_loop_is_busy(options: list[tuple[str, int]]) -> grpc.StatusCode:
    """A Check call sent while the server's event loop is blocked for 3 s, so gRPC core holds
    it untaken that long; its status."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def run() -> grpc.StatusCode:
        server = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        status: list[grpc.StatusCode] = []

        def call() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=60)
                    status.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    status.append(e.code())

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(3)  # blocks the loop, as a saturated control plane's does
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        await server.stop(0)
        return status[0]

    return asyncio.run(run())


def test_a_call_the_server_takes_late_is_answered_not_cancelled():
    # The soak found gRPC core cancelling calls left untaken for 30 s (its default) on an
    # overloaded control plane. The mechanism, shortened to 1 s: the call is CANCELLED ...
    key = "grpc.server_max_unrequested_time_in_server"
    options = Limits().server_options()
    assert (key, UNTAKEN_CALL_TIMEOUT_S) in options and UNTAKEN_CALL_TIMEOUT_S >= 600
    shortened = [(k, 1 if k == key else v) for k, v in options]
    assert _call_while_the_loop_is_busy(shortened) is grpc.StatusCode.CANCELLED
    # ... and with the control plane's options it is answered once the loop gets to it.
    assert _call_while_the_loop_is_busy(options) is grpc.StatusCode.OK
