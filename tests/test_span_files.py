"""Span files (ASTRAEA_TELEMETRY_SPAN_DIR) and `astraea traces`: spans written by the real SDK
from two "services" are put back together into one job's trace."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from astraea.plan import KvAction, KvDecision
from astraea.telemetry import TelemetryConfig, TelemetryConfigError, setup_telemetry, spans
from astraea.telemetry.span_files import (
    format_tree,
    job_ids,
    job_trace,
    kv_decision_counts,
    load_spans,
)
from astraea.tools.cli import main as cli


def _write_two_services(directory) -> None:
    """A client span in one service; the job, a segment and an API wait in another."""
    client = setup_telemetry(TelemetryConfig("client-svc", span_dir=str(directory)),
                             configure_logs=False)
    server = setup_telemetry(TelemetryConfig("server-svc", span_dir=str(directory)),
                             configure_logs=False)
    for job_id in ("j1", "j2"):
        with client.tracer.start_as_current_span("agent") as agent:
            ctx = trace.set_span_in_context(agent)
            job = spans.start_job_span(server.tracer, job_id, "qa", parent=ctx)
            seg = spans.start_segment_span(server.tracer, job_id, queue_level=0, parent=job)
            spans.finish_segment(seg, tokens=5, ttft_s=0.1)
            wait = spans.start_api_wait_span(server.tracer, job_id, "search", parent=job)
            spans.record_kv_decision(wait, KvDecision(job_id, KvAction.SWAP, "budget", {}))
            spans.finish_api_wait(wait, observed_s=1.0)
            spans.finish_job(job, jct_s=2.0, final_queue=0)
    client.shutdown()
    server.shutdown()


def test_one_jobs_trace_is_rebuilt_across_service_files(tmp_path):
    _write_two_services(tmp_path)
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir()) == [
        "client-svc", "server-svc"]
    loaded = load_spans(str(tmp_path))
    assert job_ids(loaded) == ["j1", "j2"]
    mine = job_trace(loaded, "j1")
    assert sorted(s.name for s in mine) == ["agent", "api_wait", "job", "segment"]
    assert len({s.trace_id for s in mine}) == 1
    tree = format_tree(mine).splitlines()
    # The client's span is the root; the job under it; segment and wait under the job.
    assert tree[0].startswith("agent") and "client-svc" in tree[0]
    assert tree[1].startswith("  job") and "jct_s=2.0" in tree[1]
    assert {line.split()[0] for line in tree[2:]} == {"segment", "api_wait"}
    assert all(line.startswith("    ") for line in tree[2:])
    assert kv_decision_counts(loaded) == {"swap": 2}


def test_bad_files_are_named_and_a_cut_last_line_is_skipped(tmp_path):
    _write_two_services(tmp_path)
    path = next(tmp_path.iterdir())
    good = path.read_text()
    path.write_text(good + '{"name": "cut sho')  # a process killed mid-write
    assert job_ids(load_spans(str(tmp_path))) == ["j1", "j2"]
    path.write_text('{"not": "a span"}\n' + good)
    with pytest.raises(ValueError, match=f"{path.name}:1: not a span"):
        load_spans(str(tmp_path))
    path.write_text("garbage\n" + good)
    with pytest.raises(ValueError, match=f"{path.name}:1: not a span"):
        load_spans(str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        load_spans(str(tmp_path / "missing"))
    with pytest.raises(TelemetryConfigError, match="span_dir"):
        setup_telemetry(TelemetryConfig("x", span_dir=str(path / "sub")), configure_logs=False)


def test_astraea_traces_lists_jobs_prints_one_and_refuses_an_unknown_one(tmp_path, capsys):
    _write_two_services(tmp_path)
    assert cli.main(["traces", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 jobs" in out and "  j1" in out and "  j2" in out
    assert cli.main(["traces", str(tmp_path), "--job", "j2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("agent")
    assert cli.main(["traces", str(tmp_path), "--job", "nope"]) == 2
    assert "no trace of job 'nope'" in capsys.readouterr().err


def test_span_dir_comes_from_the_environment():
    cfg = TelemetryConfig.from_env("svc", {"ASTRAEA_TELEMETRY_SPAN_DIR": "/tmp/x"})
    assert cfg.span_dir == "/tmp/x"
    assert TelemetryConfig.from_env("svc", {}).span_dir is None
