"""Agent traces: jobs as sequences of segments separated by tool calls."""

from __future__ import annotations

from dataclasses import dataclass


class TraceError(ValueError):
    """A malformed trace; the message names the file, the line (or job) and the field."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    category: str
    duration_s: float
    result_tokens: int  # appended to the context when the tool returns


@dataclass(frozen=True)
class Segment:
    prompt_tokens: int  # appended before the segment (the first carries the prompt)
    output_tokens: int
    tool: ToolCall | None  # the call that ends the segment; None on the last


@dataclass(frozen=True)
class JobTrace:
    job_id: str
    segments: tuple[Segment, ...]
    arrival_s: float | None = None
    category: str = "unknown"

    @property
    def total_tokens(self) -> int:
        """Context length at the job's end: every prompt, output and tool result."""
        return sum(
            s.prompt_tokens + s.output_tokens + (s.tool.result_tokens if s.tool else 0)
            for s in self.segments
        )

    @property
    def api_time_s(self) -> float:
        return sum(s.tool.duration_s for s in self.segments if s.tool)

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.segments)

    def new_tokens_before(self, index: int) -> int:
        """Tokens appended before segment `index`: the previous tool's result + its prompt."""
        prev = self.segments[index - 1].tool.result_tokens if index > 0 else 0
        return prev + self.segments[index].prompt_tokens

    def with_id(self, job_id: str, arrival_s: float | None) -> JobTrace:
        return JobTrace(job_id, self.segments, arrival_s, self.category)
