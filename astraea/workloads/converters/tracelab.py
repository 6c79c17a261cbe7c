"""TraceLab round traces (uw-syfi/TraceLab: real Claude Code and Codex sessions) as jobs.

The released trace (``syfi_coding_trace.jsonl.gz``, or one made with its collector) is JSONL
with one LLM round per line: ``session_id``, ``round_index``, ``input_tokens_total`` (cached
prefix plus newly appended), ``output_tokens``, ``timing_events`` (ordered, each with
``event_type`` — user_message, tool_result, reasoning, text, tool_call — and an ISO 8601
``timestamp``), ``tools`` (each with ``tool_name``, ``emitted_at``, ``result_chars``,
``tool_wall_latency_ms`` and ``tool_internal_latency_ms``, null when unknown) and the
current input's ``current_user_message_chars`` / ``current_tool_result_chars``.

One session is one job, a round one segment. A round's tools take, as TraceLab's analyses
do, the tool's own reported latency when there is one, else the observed wall latency; with
several tools the wait lasts until the last one is done (they may run side by side).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from astraea.workloads.converters.common import (
    Call,
    Options,
    build_job,
    parse_time,
    tool_category,
)
from astraea.workloads.trace import JobTrace, TraceError

_INPUT_EVENTS = ("user_message", "tool_result")


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _count(row: dict, key: str, where: str, *, required: bool = True) -> int | None:
    v = row.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TraceError(f"{where}: field {key!r} must be an integer >= 0, got {v!r}")
    return v


def _latency_s(tool: dict, where: str) -> float | None:
    for key in ("tool_internal_latency_ms", "tool_wall_latency_ms"):
        v = tool.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise TraceError(f"{where}: field {key!r} must be a number >= 0 or null, got {v!r}")
        return v / 1000.0
    return None


def _round(row: dict, where: str) -> tuple[Call, float | None]:
    """The call of one round and the time of its first event."""
    events = row.get("timing_events")
    if not isinstance(events, list):
        raise TraceError(f"{where}: field 'timing_events' must be a list")
    times = []
    ready = None
    user_chars = result_chars = 0
    for i, ev in enumerate(events):
        at = f"{where}: timing_events[{i}]"
        if not isinstance(ev, dict):
            raise TraceError(f"{at}: must be an object")
        t = parse_time(ev.get("timestamp"), at)
        times.append(t)
        if ev.get("event_type") in _INPUT_EVENTS:
            ready = t
            size = ev.get("content_chars", ev.get("result_chars", 0))
            size = size if isinstance(size, int) and size > 0 else 0
            if ev.get("event_type") == "user_message":
                user_chars += size
            else:
                result_chars += size
    # The row's own summaries, when present, count the same characters.
    user_chars = _count(row, "current_user_message_chars", where, required=False) or user_chars
    result_chars = _count(row, "current_tool_result_chars", where, required=False) or result_chars
    tools = row.get("tools") or []
    if not isinstance(tools, list):
        raise TraceError(f"{where}: field 'tools' must be a list")
    done = max(times) if times else None
    name = category = wait = None
    if tools:
        names, ends = [], []
        for i, tool in enumerate(tools):
            at = f"{where}: tools[{i}]"
            if not isinstance(tool, dict) or not isinstance(tool.get("tool_name"), str):
                raise TraceError(f"{at}: must be an object with a string 'tool_name'")
            names.append(tool["tool_name"])
            latency = _latency_s(tool, at)
            if latency is not None and tool.get("emitted_at") is not None:
                ends.append((parse_time(tool["emitted_at"], at, "emitted_at") + latency,
                             tool["tool_name"]))
        name = "+".join(dict.fromkeys(names))
        if ends:
            end, slowest = max(ends)
            category = tool_category(slowest)
            wait = end - done if done is not None else None
        else:
            category = tool_category(names[-1])
    call = Call(output_tokens=_count(row, "output_tokens", where),
                context_tokens=_count(row, "input_tokens_total", where, required=False),
                user_chars=user_chars, result_chars=result_chars, ready_s=ready, done_s=done,
                tool_name=name, tool_category=category, tool_s=wait)
    return call, (min(times) if times else None)


def read_tracelab(inputs: list[str], opts: Options, notes: list[str]) -> list[JobTrace]:
    sessions: dict[str, list[tuple[int | None, int, Call, float | None]]] = {}
    first_where: dict[str, str] = {}
    for text in inputs:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TraceError(f"{path}: no such file")
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TraceError(f"{where}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise TraceError(f"{where}: each line must be a JSON object (one round)")
                sid = row.get("session_id")
                if not isinstance(sid, str) or not sid:
                    raise TraceError(f"{where}: field 'session_id' must be a non-empty string")
                index = _count(row, "round_index", where, required=False)
                call, start = _round(row, where)
                sessions.setdefault(sid, []).append((index, lineno, call, start))
                first_where.setdefault(sid, where)
    if not sessions:
        raise TraceError(f"no rounds in {', '.join(inputs)}")
    jobs = []
    for sid, rounds in sessions.items():
        if all(r[0] is not None for r in rounds):
            rounds.sort(key=lambda r: (r[0], r[1]))
        starts = [r[3] for r in rounds if r[3] is not None]
        jobs.append(build_job(sid, [r[2] for r in rounds], min(starts) if starts else None,
                              opts, f"{first_where[sid]}: session {sid!r}"))
    return jobs
