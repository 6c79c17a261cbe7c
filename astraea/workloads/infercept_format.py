"""InferCept's own trace file: `{job_id: [segment, ...]}` (WukLab/InferCept).

Each segment has `prompt_tokens`, `completion_tokens` and, on all but the last, `api_time` (s)
and `api_token_length`. Replayed as InferCept's benchmark loader does: the first segment's
prompt is the job's prompt, each segment decodes `completion_tokens`, and a tool call appends
`api_token_length` tokens after `api_time` seconds. (The loader ignores later segments'
`prompt_tokens`, whose context is already in the job; so do we.) The file carries no
arrivals and no categories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from astraea.workloads.trace import JobTrace, Segment, ToolCall, TraceError


def _int(seg: dict, key: str, where: str, minimum: int) -> int:
    v = seg.get(key)
    if v is None:
        raise TraceError(f"{where}: missing field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TraceError(f"{where}: field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def read_infercept(path: str | Path) -> list[JobTrace]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not data:
        raise TraceError(f"{path}: an InferCept trace is a non-empty object {{job_id: [segments]}}")
    jobs = []
    for key, raw in data.items():
        where = f"{path}: job {key!r}"
        if not isinstance(raw, list) or not raw:
            raise TraceError(f"{where}: must be a non-empty list of segments")
        segments = []
        for i, seg in enumerate(raw):
            at = f"{where} segment {i}"
            if not isinstance(seg, dict):
                raise TraceError(f"{at}: must be an object")
            prompt = _int(seg, "prompt_tokens", at, 1) if i == 0 else 0
            completion = _int(seg, "completion_tokens", at, 1)
            last = i == len(raw) - 1
            tool = None
            if not last:
                api_time = seg.get("api_time")
                if isinstance(api_time, bool) or not isinstance(api_time, (int, float)) \
                        or not math.isfinite(api_time) or api_time < 0:
                    raise TraceError(f"{at}: field 'api_time' must be a number >= 0, got {api_time!r}")
                tool = ToolCall("api", "unknown", float(api_time), _int(seg, "api_token_length", at, 0))
            segments.append(Segment(prompt, completion, tool))
        jobs.append(JobTrace(str(key), tuple(segments), None, "unknown"))
    return jobs
