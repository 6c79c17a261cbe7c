"""Agents' own logs as native traces (`astraea trace convert`): Claude Code session logs,
TraceLab round traces, InferCept JSON, and the span files of a live run."""

from __future__ import annotations

from collections.abc import Callable

from astraea.workloads.converters.claude_code import read_claude_code
from astraea.workloads.converters.common import (
    DEFAULT_CHARS_PER_TOKEN,
    TOOL_CATEGORIES,
    Options,
    rebase_arrivals,
    summary,
    tool_category,
    unique_ids,
)
from astraea.workloads.converters.spans import read_spans
from astraea.workloads.converters.tracelab import read_tracelab
from astraea.workloads.infercept_format import read_infercept
from astraea.workloads.trace import JobTrace, TraceError

__all__ = ["DEFAULT_CHARS_PER_TOKEN", "FORMATS", "TOOL_CATEGORIES", "Options", "convert",
           "summary", "tool_category"]


def _read_infercept(inputs: list[str], opts: Options, notes: list[str]) -> list[JobTrace]:
    notes.append("InferCept files carry no arrivals: give --qps to replay")
    return [job for path in inputs for job in read_infercept(path)]


# --from name -> reader(inputs, options, notes) -> jobs
FORMATS: dict[str, Callable[[list[str], Options, list[str]], list[JobTrace]]] = {
    "claude-code": read_claude_code,
    "tracelab": read_tracelab,
    "infercept": _read_infercept,
    "spans": read_spans,
}


def convert(fmt: str, inputs: list[str], opts: Options | None = None,
            notes: list[str] | None = None) -> list[JobTrace]:
    """The jobs of `inputs` read as `fmt`: ids unique, arrivals (where known) from 0 in
    arrival order. Malformed input raises `TraceError` naming the file and line."""
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not inputs:
        raise TraceError("no input files")
    notes = notes if notes is not None else []
    jobs = FORMATS[fmt](list(inputs), opts or Options(), notes)
    if not jobs:
        raise TraceError(f"no jobs in {', '.join(inputs)}")
    return rebase_arrivals(unique_ids(jobs))
