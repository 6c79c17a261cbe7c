"""`astraea trace convert`: agents' own logs (Claude Code sessions, TraceLab rounds, InferCept
JSON, a live run's span files) become native traces that `load_trace` reads and `astraea
bench` replays; malformed input is an error naming the file and line."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
from pathlib import Path

import pytest

from astraea.profile import load_profile
from astraea.telemetry import TelemetryConfig, setup_telemetry
from astraea.tools.cli.main import main
from astraea.tools.replay import replay
from astraea.workloads import JobTrace, Segment, ToolCall, load_trace, read_infercept
from astraea.workloads.converters import tool_category

DATA = Path(__file__).parent / "data" / "convert"
CLAUDE = DATA / "claude_code_session.jsonl"
TRACELAB = DATA / "tracelab_rounds.jsonl"
INFERCEPT = DATA / "infercept_trace.json"
LONG = "llama3-8b-h100"  # coding-agent prompts need a long context window


def _convert(capsys, fmt: str, inputs, out: Path, *extra: str) -> str:
    code = main(["trace", "convert", "--from", fmt, *map(str, inputs), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def _error(capsys, fmt: str, inputs, tmp_path) -> str:
    code = main(["trace", "convert", "--from", fmt, *map(str, inputs),
                 "-o", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "astraea: error: " in err
    return err


def _tools(job: JobTrace) -> list[ToolCall]:
    return [s.tool for s in job.segments if s.tool]


# -- Claude Code ----------------------------------------------------------------------------

def test_claude_code_session_is_one_job_with_a_segment_per_model_call(tmp_path, capsys):
    out = tmp_path / "cc.jsonl"
    err = _convert(capsys, "claude-code", [CLAUDE], out)
    [job] = load_trace(out)
    assert job.job_id == "3f1c9a52-7b4e-4d21-9c0a-58e2f61d7a10"
    assert job.arrival_s == 0.0 and job.category == "coding-agent"
    # Five responses (message ids), each written as one line per content block: the final
    # usage counts, not the streaming partial (9) of the first.
    assert [s.output_tokens for s in job.segments] == [118, 161, 74, 212, 41]
    # The first prompt is the whole first input (uncached + cache write + cache read).
    assert job.segments[0].prompt_tokens == 4 + 14982
    # Later ones: the input's growth past the previous input and output, tool result included.
    assert job.new_tokens_before(1) == (6 + 1287 + 14982) - (4 + 14982) - 118
    assert job.new_tokens_before(4) == (4 + 266 + 16870) - (4 + 103 + 16767) - 212
    tools = _tools(job)
    assert [(t.name, t.category) for t in tools] == [
        ("Read", "file"), ("Grep+Bash", "shell"), ("user_reply", "human"), ("Edit", "edit")]
    # From the response's last line to the last tool result (the Bash test run), and to the
    # user's next message.
    assert tools[1].duration_s == pytest.approx(21.096 - 14.388, abs=1e-6)
    assert tools[2].duration_s == pytest.approx(68.270 - 27.554, abs=1e-6)
    assert "1 jobs, 5 segments, 4 tool calls" in err
    assert "shell" in err and "human" in err and "isSidechain" in err


def test_claude_code_without_usage_estimates_tokens_from_text(tmp_path, capsys):
    lines = [json.loads(x) for x in CLAUDE.read_text().splitlines()]
    for obj in lines:
        if obj.get("type") == "assistant":
            del obj["message"]["usage"]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps(o) + "\n" for o in lines))
    _convert(capsys, "claude-code", [bare], tmp_path / "a.jsonl", "--tokenizer-ratio", "4")
    _convert(capsys, "claude-code", [bare], tmp_path / "b.jsonl", "--tokenizer-ratio", "2")
    [a], [b] = load_trace(tmp_path / "a.jsonl"), load_trace(tmp_path / "b.jsonl")
    first_prompt = len("The cart total is off by a cent for some discounts. Find where totals "
                       "are rounded and fix it.")
    assert a.segments[0].prompt_tokens == -(-first_prompt // 4)
    assert b.segments[0].prompt_tokens == -(-first_prompt // 2)
    assert b.total_tokens > 1.8 * a.total_tokens


def test_claude_code_folder_skips_subagent_files_and_caps_waits(tmp_path, capsys):
    project = tmp_path / "-home-dev-shop"
    (project / "3f1c" / "subagents").mkdir(parents=True)
    shutil.copy(CLAUDE, project / "3f1c9a52.jsonl")
    shutil.copy(CLAUDE, project / "3f1c" / "subagents" / "agent-1.jsonl")
    out = tmp_path / "cc.jsonl"
    _convert(capsys, "claude-code", [tmp_path], out, "--max-wait-s", "10")
    [job] = load_trace(out)
    assert max(t.duration_s for t in _tools(job)) == 10.0


@pytest.mark.parametrize("edit, needle", [
    (lambda lines: lines.__setitem__(3, "{not json\n"), ":4: invalid JSON"),
    (lambda lines: lines.__setitem__(2, json.dumps({**json.loads(lines[2]), "timestamp": "soon"})
                                     + "\n"), ":3: field 'timestamp' is not an ISO 8601 time"),
    (lambda lines: lines.__setitem__(1, json.dumps({**json.loads(lines[1]), "message": "hi"})
                                     + "\n"), ":2: a user line needs 'message' with 'content'"),
    (lambda lines: lines.__setitem__(4, lines[4].replace('"name": "Read", ', '')),
     ":5: a tool_use block needs 'id' and 'name'"),
])
def test_malformed_claude_code_line_is_named(tmp_path, capsys, edit, needle):
    lines = CLAUDE.read_text().splitlines(keepends=True)
    edit(lines)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    err = _error(capsys, "claude-code", [bad], tmp_path)
    assert f"{bad}{needle}" in err, err


def test_missing_input_is_an_error(tmp_path, capsys):
    assert "no such file or directory" in _error(capsys, "claude-code",
                                                 [tmp_path / "nope.jsonl"], tmp_path)


def test_tool_names_map_to_categories():
    assert [tool_category(n) for n in ("Read", "Bash", "Edit", "WebFetch", "Task", "TodoWrite",
                                       "mcp__github__create_issue", "exec_command", "Frobnicate")] \
        == ["file", "shell", "edit", "web", "subagent", "internal", "mcp", "shell", "other"]


# -- TraceLab -------------------------------------------------------------------------------

def test_tracelab_rounds_become_jobs_per_session(tmp_path, capsys):
    gz = tmp_path / "rounds.jsonl.gz"
    gz.write_bytes(gzip.compress(TRACELAB.read_bytes()))
    out = tmp_path / "tl.jsonl"
    err = _convert(capsys, "tracelab", [gz], out)
    claude, codex = load_trace(out)
    assert claude.job_id.startswith("claude:") and codex.job_id.startswith("codex:")
    assert claude.arrival_s == 0.0
    assert codex.arrival_s == pytest.approx(61.500 - 10.120)
    assert [s.output_tokens for s in claude.segments] == [212, 96, 388, 57, 145]
    assert claude.segments[0].prompt_tokens == 21480
    assert claude.new_tokens_before(1) == 22701 - 21480 - 212
    # Grep and Bash ran side by side: the wait lasts until Bash's reported 8.405 s are over.
    assert [(t.name, t.category, round(t.duration_s, 3)) for t in _tools(claude)] == [
        ("Grep+Bash", "shell", 8.405), ("Read", "file", 0.096), ("user_reply", "human", 94.791),
        ("WebSearch", "web", 14.216)]
    assert [t.category for t in _tools(codex)] == ["shell", "edit"]
    assert "2 jobs, 8 segments, 6 tool calls" in err


def test_malformed_tracelab_row_is_named(tmp_path, capsys):
    lines = TRACELAB.read_text().splitlines(keepends=True)
    row = json.loads(lines[2])
    row["output_tokens"] = "many"
    lines[2] = json.dumps(row) + "\n"
    del_sid = json.loads(lines[4])
    del del_sid["session_id"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    assert f"{bad}:3: field 'output_tokens' must be an integer" in \
        _error(capsys, "tracelab", [bad], tmp_path)
    lines[2] = TRACELAB.read_text().splitlines(keepends=True)[2]
    lines[4] = json.dumps(del_sid) + "\n"
    bad.write_text("".join(lines))
    assert f"{bad}:5: field 'session_id'" in _error(capsys, "tracelab", [bad], tmp_path)


# -- InferCept --------------------------------------------------------------------------------

def test_infercept_json_becomes_the_same_jobs_in_native_jsonl(tmp_path, capsys):
    out = tmp_path / "ic.jsonl"
    err = _convert(capsys, "infercept", [INFERCEPT], out)
    assert out.read_text().startswith('{"job_id"')  # JSONL now, not the InferCept object
    assert load_trace(out) == read_infercept(INFERCEPT)
    assert "--qps" in err


# -- span files of a live run ---------------------------------------------------------------

TIME_SCALE = 0.1
RUN_JOBS = [
    JobTrace("r0", (Segment(300, 20, ToolCall("search", "qa", 2.0, 40)),
                    Segment(30, 25, ToolCall("calc", "math", 0.5, 8)),
                    Segment(10, 15, None)), 0.0, "qa"),
    JobTrace("r1", (Segment(500, 30, ToolCall("tts", "audio", 3.0, 0)),
                    Segment(5, 10, None)), 1.5, "audio"),
    JobTrace("r2", (Segment(120, 12, None),), 2.5, "chat"),
]


async def _live_run(span_dir: Path) -> None:
    """A control plane and a simulated worker over loopback gRPC, every service (and the
    replaying client) writing its spans to `span_dir`, as a stack run with
    ASTRAEA_TELEMETRY_SPAN_DIR does."""
    from control_plane.service.context import ServiceConfig
    from control_plane.service.server import serve
    from worker.process import run_worker
    from worker.sim.backend import SimulatedBackend

    tels = {n: setup_telemetry(TelemetryConfig(n, span_dir=str(span_dir)), configure_logs=False)
            for n in ("control-plane", "worker", "client")}
    prof = load_profile("gptj-6b-a100")
    server = await serve("127.0.0.1:0", "astraea", prof.name, ServiceConfig(time_scale=TIME_SCALE),
                         tracer=tels["control-plane"].tracer)
    address = f"127.0.0.1:{server.port}"
    worker = asyncio.create_task(run_worker(
        address, SimulatedBackend(prof, time_scale=TIME_SCALE), "w0", tracer=tels["worker"].tracer))
    try:
        for _ in range(1000):
            if server.control_plane.registry.workers:
                break
            await asyncio.sleep(0.01)
        result = await replay(RUN_JOBS, address, prof, TIME_SCALE, log=open("/dev/null", "w"),
                              tracer=tels["client"].tracer)
        assert not result.errors, result.errors
    finally:
        await server.stop(grace=0.5)
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(worker, 5)
        for tel in tels.values():
            tel.shutdown()


@pytest.fixture(scope="module")
def span_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("spans")
    asyncio.run(_live_run(directory))
    return directory


def test_span_files_of_a_live_run_give_back_its_jobs(span_dir, tmp_path, capsys):
    out = tmp_path / "live.jsonl"
    err = _convert(capsys, "spans", [span_dir], out, "--time-scale", str(TIME_SCALE))
    got = {j.job_id: j for j in load_trace(out)}
    assert set(got) == {j.job_id for j in RUN_JOBS}
    for orig in RUN_JOBS:
        job = got[orig.job_id]
        assert job.category == orig.category
        assert [s.output_tokens for s in job.segments] == [s.output_tokens for s in orig.segments]
        # What each segment appended (the tool's result and its prompt) as the worker saw it.
        assert [job.new_tokens_before(i) for i in range(len(job.segments))] == \
            [orig.new_tokens_before(i) for i in range(len(orig.segments))]
        assert [t.category for t in _tools(job)] == [t.category for t in _tools(orig)]
        for t, o in zip(_tools(job), _tools(orig), strict=True):
            # Measured: the tool's sleep plus the client's round trips (scheduler seconds).
            assert o.duration_s - 0.05 <= t.duration_s <= o.duration_s + 1.5
        assert job.arrival_s == pytest.approx(orig.arrival_s, abs=1.5)
    assert "3 jobs, 6 segments, 3 tool calls" in err


def test_span_files_without_the_workers_name_what_is_missing(span_dir, tmp_path, capsys):
    only_cp = tmp_path / "cp"
    only_cp.mkdir()
    for f in span_dir.glob("control-plane-*.jsonl"):
        shutil.copy(f, only_cp / f.name)
    err = _error(capsys, "spans", [only_cp], tmp_path)
    assert "no worker 'admission' span" in err and "span files" in err


# -- every converted trace replays ----------------------------------------------------------

@pytest.mark.parametrize("fmt, source, extra", [
    ("claude-code", CLAUDE, []), ("tracelab", TRACELAB, []), ("infercept", INFERCEPT, ["--qps", "1"]),
    ("spans", None, []),
])
def test_astraea_bench_runs_on_a_converted_trace(fmt, source, extra, span_dir, tmp_path, capsys):
    out = tmp_path / f"{fmt}.jsonl"
    conv = ["--time-scale", str(TIME_SCALE)] if fmt == "spans" else []
    _convert(capsys, fmt, [source or span_dir], out, *conv)
    rows = tmp_path / "rows.json"
    assert main(["bench", "--workload", str(out), "--profile", LONG, "--jobs", "3",
                 "--policies", "vllm-fcfs,astraea", "--parallel", "1", "--out", str(rows),
                 *extra]) == 0, capsys.readouterr().err
    result = json.loads(rows.read_text())
    done = {r["policy"]: r["jobs_completed"] for r in result["rows"]}
    assert done == {"vllm-fcfs": 3, "astraea": 3}
