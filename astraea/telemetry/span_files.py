"""Read the span files the services write with ASTRAEA_TELEMETRY_SPAN_DIR, and show one job's
trace as a tree (`astraea traces DIR --job ID`): traces to look at without a collector.

Each line is one span as the OpenTelemetry SDK serialises it (`ReadableSpan.to_json`); the
files of all services of a run sit in one directory, so a trace that crosses processes is put
together again here by trace and parent ids.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from astraea.telemetry.spans import JOB, JOB_ID, KV_ACTION, KV_DECISION_EVENT


@dataclass
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    start: datetime
    end: datetime
    attributes: dict
    events: list = field(default_factory=list)
    links: list = field(default_factory=list)
    status: str = "UNSET"

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_span(obj: dict) -> SpanRecord:
    ctx = obj["context"]
    return SpanRecord(
        name=obj["name"], trace_id=ctx["trace_id"], span_id=ctx["span_id"],
        parent_id=obj.get("parent_id"),
        service=obj.get("resource", {}).get("attributes", {}).get("service.name", "?"),
        start=_time(obj["start_time"]), end=_time(obj["end_time"]),
        attributes=obj.get("attributes") or {}, events=obj.get("events") or [],
        links=obj.get("links") or [], status=(obj.get("status") or {}).get("status_code", "UNSET"))


def load_spans(directory: str) -> list[SpanRecord]:
    """Every span in the directory's ``*.jsonl`` files. A line cut short by a killed process
    is skipped; anything else malformed raises ValueError naming the file and line."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory")
    out: list[SpanRecord] = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_span(json.loads(line)))
            except json.JSONDecodeError as e:
                if i == len(lines) and not line.endswith("\n"):
                    continue  # the last line of a process killed mid-write
                raise ValueError(f"{path}:{i}: not a span: {e}") from None
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a span (missing {e})") from None
    return out


def kv_decision_counts(spans: Iterable[SpanRecord]) -> dict[str, int]:
    """How many KV decisions of each action (preserve, swap, discard) the traces record: one
    ``kv_decision`` event per decision, on the job's ``api_wait`` or ``segment`` span."""
    counts: dict[str, int] = defaultdict(int)
    for s in spans:
        for event in s.events:
            if event.get("name") == KV_DECISION_EVENT:
                action = (event.get("attributes") or {}).get(KV_ACTION)
                if action:
                    counts[action] += 1
    return dict(counts)


def job_ids(spans: Iterable[SpanRecord]) -> list[str]:
    return sorted({s.attributes[JOB_ID] for s in spans if s.name == JOB and JOB_ID in s.attributes})


def job_trace(spans: list[SpanRecord], job_id: str) -> list[SpanRecord]:
    """All spans of the trace holding the job's ``job`` span (client, control plane, worker)."""
    roots = [s for s in spans if s.name == JOB and s.attributes.get(JOB_ID) == job_id]
    if not roots:
        raise ValueError(f"no trace of job {job_id!r}")
    trace_ids = {s.trace_id for s in roots}
    return [s for s in spans if s.trace_id in trace_ids]


_SHOWN = ("astraea.queue_level", "astraea.hrrn_score", "astraea.worker_id", "astraea.tokens",
          "astraea.ttft_s", "astraea.tool_category", "astraea.api.predicted_s",
          "astraea.api.observed_s", "astraea.kv_action", "astraea.kv_reason", "astraea.jct_s",
          "astraea.final_queue", "astraea.category", "astraea.prefill_tokens",
          "astraea.end_reason")


def _brief(s: SpanRecord) -> str:
    parts = []
    for key in _SHOWN:
        if key in s.attributes:
            v = s.attributes[key]
            parts.append(f"{key.removeprefix('astraea.')}={round(v, 3) if isinstance(v, float) else v}")
    return " ".join(parts)


def format_tree(spans: list[SpanRecord]) -> str:
    """Indented tree by parent, children in start order, with the main attributes."""
    if not spans:
        return ""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_id if s.parent_id in ids else None].append(s)
    t0 = min(s.start for s in spans)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start):
            offset = (s.start - t0).total_seconds()
            status = "" if s.status in ("UNSET", "OK") else f" [{s.status}]"
            lines.append(f"{'  ' * depth}{s.name:<{max(1, 14 - 2 * depth)}} "
                         f"+{offset:8.3f}s {s.duration_s:8.3f}s  {s.service:<22} "
                         f"{_brief(s)}{status}".rstrip())
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)
