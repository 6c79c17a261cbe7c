"""`astraea chaos`: a short replay on real process stacks (predictor, control plane with
durable state, simulated workers, OpenAI gateway) while a worker, the predictor, the gateway
and the control plane are SIGKILLed in turn and restarted by the supervisor; every job must
end with the tokens of the clean run — for gRPC jobs exactly the simulated engine's ids, for
HTTP jobs the engine's sequence for the job the gateway reports. Also: the comparison itself
catches a repeated, a lost or a wrong token, and a bad --kills is refused before any stack
starts."""

from __future__ import annotations

import json

import pytest

from astraea.tools.chaos import (
    ChaosOptions,
    JobTokens,
    KillRecord,
    RunResult,
    SegmentTokens,
    run_chaos,
)
from astraea.tools.chaos_report import ChaosReport, compare_job, write_json
from astraea.tools.cli.main import main
from astraea.workloads.trace import JobTrace, Segment, ToolCall
from worker.sim.backend import placeholder_token

JOBS = 30
HTTP_EVERY = 3  # 10 of the 30 through the gateway
TIME_SCALE = 0.5
KILLS = ("worker", "predictor", "control-plane", "gateway")


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def _trace() -> list[JobTrace]:
    """Jobs arriving every 4 virtual s (60 s of wall time at 0.5), each with 3-4 segments of
    60-130 tokens (long enough that a kill often lands mid-stream) and tools of 1-3 s."""
    jobs = []
    for k in range(JOBS):
        n = 3 + k % 2
        segs = [Segment(prompt_tokens=120 if i == 0 else 0, output_tokens=60 + (17 * (k + i)) % 71,
                        tool=None if i == n - 1 else ToolCall("search", "search",
                                                              1.0 + (k + i) % 3, 20))
                for i in range(n)]
        jobs.append(JobTrace(f"j{k}", tuple(segs), arrival_s=4.0 * k, category="qa"))
    return jobs


def test_every_job_keeps_its_tokens_while_each_service_is_killed_in_turn(tmp_path):
    jobs = _trace()
    # The gateway last: it is the slowest to start again (it loads a tokenizer), and a kill
    # must land while jobs still arrive; its recovery may run past the replay's end.
    report = run_chaos(ChaosOptions(jobs, time_scale=TIME_SCALE, interval_s=0.5, kills=KILLS,
                                    http_every=HTTP_EVERY, workers=2, parallel=True,
                                    log_dir=str(tmp_path / "logs")))
    text = report.format()
    print(text)
    kills = report.chaos.kills
    # Every kill landed during the replay, on the service named, and it came back.
    assert [k.service for k in kills] == ["worker-w1", "predictor", "control-plane", "gateway"]
    assert all(k.skipped is None and k.recovered_s is not None for k in kills), text
    assert all(k.in_flight_grpc + k.in_flight_http > 0 for k in kills), text
    cp = kills[2]
    # Jobs came back from the store; clients retried, and streams cut mid-segment resumed.
    assert cp.restored and cp.retries > 0 and cp.streams_cut > 0, text
    assert report.ok and not report.differences, text
    assert "verdict: PASS" in text

    # Independently of the clean run: each gRPC segment is exactly the engine's sequence for
    # its job (none lost, none repeated), as many tokens as the trace asked for.
    http_jobs = 0
    for job in jobs:
        rec, clean = report.chaos.jobs[job.job_id], report.clean.jobs[job.job_id]
        assert rec.error is None and clean.error is None
        assert [s.count for s in rec.segments] == [s.output_tokens for s in job.segments]
        if rec.path == "grpc":
            for seg, clean_seg in zip(rec.segments, clean.segments):
                assert seg.tokens == [placeholder_token(rec.job_id, i) for i in range(seg.count)]
                assert seg.tokens == clean_seg.tokens
            assert not rec.left_open
        else:
            http_jobs += 1
            assert all(s.text_ok for s in rec.segments + clean.segments)
    assert http_jobs == JOBS // HTTP_EVERY

    out = tmp_path / "chaos.json"
    write_json(report, str(out))
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["totals"]["grpc_same"] == data["totals"]["grpc_jobs"]
    assert len(data["kills"]) == 4


def _grpc(job_id: str, *counts: int) -> JobTokens:
    return JobTokens(job_id, "grpc", [SegmentTokens(job_id, n, tokens=[
        placeholder_token(job_id, i) for i in range(n)]) for n in counts])


def test_the_comparison_catches_a_repeated_a_lost_or_a_wrong_token():
    clean = _grpc("a", 5, 3)
    assert compare_job(clean, _grpc("a", 5, 3)) is None
    repeated = _grpc("a", 5, 3)
    repeated.segments[0].tokens[3] = repeated.segments[0].tokens[2]  # a token sent twice
    assert compare_job(clean, repeated) == "segment 0: token ids differ from index 3"
    lost = _grpc("a", 5, 2)
    assert compare_job(clean, lost) == "segment 1: 2 tokens, clean run 3"
    failed = _grpc("a", 5)
    failed.error = "AstraeaError: RunSegment: UNAVAILABLE"
    assert "failed in the chaos run" in compare_job(clean, failed)
    unfinished = _grpc("a", 5, 3)
    unfinished.left_open = ["a"]
    assert compare_job(clean, unfinished) == "the control plane did not finish it in the chaos run"
    http_clean = JobTokens("h", "http", [SegmentTokens("x", 4, text_ok=True)])
    http_ok = JobTokens("h", "http", [SegmentTokens("y", 4, text_ok=True)])  # another job id
    assert compare_job(http_clean, http_ok) is None
    http_bad = JobTokens("h", "http", [SegmentTokens("y", 4, text_ok=False)])
    assert "chaos run's text is not the engine's sequence for job y" in compare_job(
        http_clean, http_bad)


def test_the_verdict_counts_each_path_and_fails_on_a_difference_or_a_kill_that_missed():
    clean = {"j0": _grpc("chaos-j0", 4), "j1": JobTokens(
        "chaos-j1", "http", [SegmentTokens("x", 4, text_ok=True)])}
    bad = _grpc("chaos-j0", 3)  # a token lost
    chaos = {"j0": bad, "j1": JobTokens("chaos-j1", "http", [SegmentTokens("y", 4, text_ok=True)])}
    kill = KillRecord("control-plane", 5.0, 1, 1, recovered_s=2.0)
    report = ChaosReport(RunResult(clean, [], 1, "", []), RunResult(chaos, [kill], 1, "", []),
                         {"j0": compare_job(clean["j0"], bad)}, {"gateway_state": True})
    t = report.totals()
    assert (t["grpc_same"], t["grpc_jobs"], t["http_same"], t["http_jobs"]) == (0, 1, 1, 1)
    assert not report.ok and "verdict: FAIL: 1 job(s) differ" in report.format()
    report.differences.clear()
    assert report.ok and "verdict: PASS" in report.format()
    kill.skipped = "the replay was over"
    assert not report.ok and "kills that did not land or recover: control-plane" in report.format()


def test_an_unknown_service_to_kill_is_refused_before_any_stack_starts(capsys):
    assert main(["chaos", "--jobs", "2", "--kills", "worker,database"]) == 2
    err = capsys.readouterr().err
    assert "unknown service(s) database" in err and "control-plane" in err
