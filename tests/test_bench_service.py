"""`astraea bench-service`: a small, short run whose report must be well-formed and
consistent. Speed is not asserted here (it belongs to the benchmark, not to a timed test)."""

from __future__ import annotations

import json
import math

import pytest

from astraea.tools.cli.main import main
from control_plane.service.stats import ServiceStats, percentile, summarize_ms


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    # The services inherit the environment: no OTLP exports or console spans from tests.
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def _ordered(summary: dict) -> None:
    assert summary["count"] > 0
    assert 0 <= summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["mean_ms"] >= 0


def test_bench_service_small_run_reports_consistent_figures(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["bench-service", "--jobs", "20", "--seconds", "2", "--warmup", "0.5",
                 "--workers", "1", "--segments-per-job", "3", "--tool-ms", "1",
                 "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert code == 0, (r["errors"], r["error_examples"])
    assert "segments/s completed" in printed and "plan, event -> queued" in printed

    # Segments completed, every one with all its tokens, in order, as the engine made them.
    assert r["segments"] > 0 and r["errors"] == {} and r["bad_token_segments"] == 0
    assert r["tokens_per_s"] == pytest.approx(r["segments_per_s"] * 4)
    assert r["segments_per_s"] == pytest.approx(r["segments"] / r["window_s"])
    assert 0 < r["jobs_in_flight_mean"] <= 20

    # The control plane saw at least the segments' own submissions and ends.
    kinds = r["control_plane_events_by_kind"]
    assert kinds["run_segment"] > 0 and kinds["segment_ended"] > 0 and kinds["tool_call"] > 0
    assert r["control_plane_events"] == sum(kinds.values())
    assert r["control_plane_events"] >= kinds["run_segment"] + kinds["segment_ended"]
    assert r["plans"] > 0 and r["plans_with_actions"] <= r["plans"]

    for name in ("plan_latency", "build_plan", "client_segment_latency"):
        _ordered(r[name])
    # build_plan is part of the event -> queued span of the same plans.
    assert r["build_plan"]["count"] == r["plan_latency"]["count"]
    assert r["build_plan"]["mean_ms"] <= r["plan_latency"]["mean_ms"]

    cpu = r["cpu_percent"]
    assert cpu["control_plane"] > 0 and len(cpu["workers"]) == 1
    assert r["control_plane_cpu_ms_per_segment"] > 0
    assert all(code == 0 for code in r["exit_codes"].values()), r["exit_codes"]


def test_service_stats_window_and_percentiles():
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    s = summarize_ms([0.001, 0.003, 0.002])
    assert s["count"] == 3 and s["p50_ms"] == pytest.approx(2.0) and s["max_ms"] == pytest.approx(3.0)

    stats = ServiceStats(max_samples=4)
    stats.events["tokens"] += 2
    for i in range(6):
        stats.record_plan(0.001 * (i + 1), 0.0001, actions=i % 2)
    snap = stats.snapshot()
    assert snap["events"] == {"tokens": 2} and snap["plans"] == 6
    assert snap["plans_with_actions"] == 3
    assert snap["plan_latency"]["count"] == 4  # a bounded ring: the newest samples
    assert snap["plan_latency"]["max_ms"] == pytest.approx(6.0)
    stats.reset()
    snap = stats.snapshot()
    assert snap["events"] == {} and snap["plans"] == 0 and snap["plan_latency"]["count"] == 0
