"""The native trace format: JSONL, one job per line, read and written here (docs/design.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from astraea.workloads.trace import JobTrace, Segment, ToolCall, TraceError


def _need(obj: dict, key: str, kind, where: str, *, minimum: float | None = None):
    if key not in obj:
        raise TraceError(f"{where}: missing field {key!r}")
    value = obj[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise TraceError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {value!r}")
    if minimum is not None and value < minimum:
        raise TraceError(f"{where}: field {key!r} must be >= {minimum}, got {value!r}")
    return value


def _kind_name(kind) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, str(kind))


NUMBER = (int, float)


def parse_job(obj: object, where: str) -> JobTrace:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a job must be a JSON object")
    job_id = _need(obj, "job_id", str, where)
    if not job_id:
        raise TraceError(f"{where}: field 'job_id' must not be empty")
    arrival = obj.get("arrival_s")
    if arrival is not None:
        arrival = float(_need(obj, "arrival_s", NUMBER, where, minimum=0))
    raw_segments = _need(obj, "segments", list, where)
    if not raw_segments:
        raise TraceError(f"{where}: field 'segments' must not be empty")
    segments = []
    for i, seg in enumerate(raw_segments):
        at = f"{where}: segments[{i}]"
        if not isinstance(seg, dict):
            raise TraceError(f"{at}: must be an object")
        prompt = _need(seg, "prompt_tokens", int, at, minimum=1 if i == 0 else 0)
        output = _need(seg, "output_tokens", int, at, minimum=1)
        tool_raw = seg.get("tool")
        last = i == len(raw_segments) - 1
        if tool_raw is None:
            if not last:
                raise TraceError(f"{at}: field 'tool' is required on every segment but the last")
            tool = None
        else:
            if last:
                raise TraceError(f"{at}: field 'tool' must be null on the last segment")
            if not isinstance(tool_raw, dict):
                raise TraceError(f"{at}: field 'tool' must be an object or null")
            tat = f"{at}.tool"
            tool = ToolCall(
                name=_need(tool_raw, "name", str, tat),
                category=_need(tool_raw, "category", str, tat),
                duration_s=float(_need(tool_raw, "duration_s", NUMBER, tat, minimum=0)),
                result_tokens=_need(tool_raw, "result_tokens", int, tat, minimum=0),
            )
        segments.append(Segment(prompt, output, tool))
    category = obj.get("category")
    if category is None:
        category = next((s.tool.category for s in segments if s.tool), "unknown")
    elif not isinstance(category, str):
        raise TraceError(f"{where}: field 'category' must be a string")
    return JobTrace(job_id, tuple(segments), arrival, category)


def read_native(path: str | Path) -> list[JobTrace]:
    path = Path(path)
    jobs, seen = [], set()
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: invalid JSON: {e.msg}") from None
            job = parse_job(obj, where)
            if job.job_id in seen:
                raise TraceError(f"{where}: field 'job_id': duplicate id {job.job_id!r}")
            seen.add(job.job_id)
            jobs.append(job)
    if not jobs:
        raise TraceError(f"{path}: the trace has no jobs")
    return jobs


def job_to_dict(job: JobTrace) -> dict:
    out: dict = {"job_id": job.job_id}
    if job.arrival_s is not None:
        out["arrival_s"] = round(job.arrival_s, 6)
    out["category"] = job.category
    out["segments"] = [
        {
            "prompt_tokens": s.prompt_tokens,
            "output_tokens": s.output_tokens,
            "tool": None if s.tool is None else {
                "name": s.tool.name,
                "category": s.tool.category,
                "duration_s": round(s.tool.duration_s, 6),
                "result_tokens": s.tool.result_tokens,
            },
        }
        for s in job.segments
    ]
    return out


def write_native(jobs: Iterable[JobTrace], path: str | Path) -> int:
    n = 0
    with Path(path).open("w") as f:
        for job in jobs:
            f.write(json.dumps(job_to_dict(job), separators=(",", ":")) + "\n")
            n += 1
    return n
