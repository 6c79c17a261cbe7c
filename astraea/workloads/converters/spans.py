"""A live run's span files (``ASTRAEA_TELEMETRY_SPAN_DIR``) as jobs, to re-simulate the run.

Per job the control plane writes a ``job`` span (start: the job's StartJob), a ``segment``
span per segment (``astraea.segment_index``; ``astraea.tokens``, the output, once it ends)
and an ``api_wait`` span per tool call (``astraea.tool_category``; ``astraea.api.observed_s``,
the measured wait in scheduler seconds). The prompt sizes are on the worker's ``admission``
span under each segment (``astraea.new_tokens``: the tool's result and the next prompt
together, as the client sent them), so the worker's span files must be in the directory too.

Arrivals are job-span starts in wall seconds over `time_scale` (the run's ``--time-scale``);
observed tool waits are already in scheduler seconds. A segment that never ended (the job
was cancelled) ends the job there. Tools carry no names in the spans: the category is used.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from astraea.telemetry.span_files import SpanRecord, load_spans
from astraea.telemetry.spans import (
    API_OBSERVED_S,
    API_WAIT,
    CATEGORY,
    JOB,
    JOB_ID,
    SEGMENT,
    SEGMENT_INDEX,
    TOKENS,
    TOOL_CATEGORY,
)
from astraea.workloads.converters.common import Options
from astraea.workloads.trace import JobTrace, Segment, ToolCall, TraceError

# The worker's span of one admission and its prompt size (worker/process.py; the foundation
# cannot import a service, so the names are repeated here).
ADMISSION = "admission"
NEW_TOKENS = "astraea.new_tokens"


def _job(root: SpanRecord, children: list[SpanRecord], admissions: dict[str, list[SpanRecord]],
         t0, opts: Options, notes: list[str], where: str) -> JobTrace | None:
    job_id = root.attributes[JOB_ID]
    segs = sorted((s for s in children if s.name == SEGMENT),
                  key=lambda s: (s.attributes.get(SEGMENT_INDEX, 0), s.start))
    waits = sorted((s for s in children if s.name == API_WAIT), key=lambda s: s.start)
    done = []
    for s in segs:
        if not isinstance(s.attributes.get(TOKENS), int):
            notes.append(f"job {job_id!r}: segment {len(done)} never ended; the job stops there")
            break
        done.append(s)
    if not done:
        notes.append(f"job {job_id!r}: no finished segment, skipped")
        return None
    segments = []
    for i, seg in enumerate(done):
        adm = sorted(admissions.get(seg.span_id, []), key=lambda a: a.start)
        if not adm or not isinstance(adm[0].attributes.get(NEW_TOKENS), int):
            raise TraceError(f"{where}: job {job_id!r} segment {i}: no worker '{ADMISSION}' "
                             f"span with {NEW_TOKENS!r} (are the workers' span files there?)")
        new = adm[0].attributes[NEW_TOKENS]
        tool = None
        if i + 1 < len(done):
            nxt = done[i + 1]
            wait = next((w for w in waits if seg.start <= w.start <= nxt.start), None)
            if wait is None:
                raise TraceError(f"{where}: job {job_id!r}: no '{API_WAIT}' span between "
                                 f"segments {i} and {i + 1}")
            observed = wait.attributes.get(API_OBSERVED_S)
            duration = float(observed) if isinstance(observed, int | float) \
                else wait.duration_s / opts.time_scale
            category = str(wait.attributes.get(TOOL_CATEGORY, "unknown"))
            tool = ToolCall(category, category, max(0.0, duration), 0)
        segments.append(Segment(max(1, new) if i == 0 else new,
                                max(1, seg.attributes[TOKENS]), tool))
    arrival = (root.start - t0).total_seconds() / opts.time_scale
    return JobTrace(job_id, tuple(segments), arrival,
                    str(root.attributes.get(CATEGORY, "unknown")))


def read_spans(inputs: list[str], opts: Options, notes: list[str]) -> list[JobTrace]:
    jobs = []
    for text in inputs:
        if not Path(text).is_dir():
            raise TraceError(f"{text}: give the span directory (ASTRAEA_TELEMETRY_SPAN_DIR)")
        try:
            spans = load_spans(text)
        except ValueError as e:
            raise TraceError(str(e)) from None
        roots = [s for s in spans if s.name == JOB and isinstance(s.attributes.get(JOB_ID), str)]
        if not roots:
            raise TraceError(f"{text}: no '{JOB}' spans (the control plane's span file?)")
        children: dict[str, list[SpanRecord]] = defaultdict(list)
        admissions: dict[str, list[SpanRecord]] = defaultdict(list)
        for s in spans:
            if s.name in (SEGMENT, API_WAIT) and s.parent_id:
                children[s.parent_id].append(s)
            elif s.name == ADMISSION and s.parent_id:
                admissions[s.parent_id].append(s)
        ids = [r.attributes[JOB_ID] for r in roots]
        if len(set(ids)) < len(ids):
            notes.append(f"{text}: job ids repeat (several runs in one directory?); the "
                         "repeats get a ~n suffix")
        t0 = min(r.start for r in roots)
        for root in sorted(roots, key=lambda r: r.start):
            job = _job(root, children[root.span_id], admissions, t0, opts, notes, text)
            if job is not None:
                jobs.append(job)
    return jobs
