"""What the converters share: the map from agent tool names to tool categories, timestamps,
token estimates from text length, and the assembly of one job from its model calls."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from astraea.workloads.trace import JobTrace, Segment, ToolCall, TraceError

# Coding agents' tools by what they wait on; a scheduler's predictor learns per category, so
# tools with alike durations share one. Names from Claude Code (Read, Bash, ...) and Codex
# (exec_command, apply_patch, ...). Lookups are case-insensitive.
_CATEGORY_OF = {
    "file": ("read", "glob", "grep", "ls", "notebookread", "view_image", "read_file",
             "list_dir", "grep_files"),
    "edit": ("edit", "multiedit", "write", "notebookedit", "apply_patch"),
    "shell": ("bash", "bashoutput", "killshell", "killbash", "exec_command", "shell",
              "write_stdin", "local_shell", "container.exec"),
    "web": ("webfetch", "websearch", "web_search", "web_fetch"),
    "subagent": ("task", "agent"),
    "human": ("askuserquestion", "request_user_input"),
    "internal": ("todowrite", "todoread", "exitplanmode", "enterplanmode", "skill",
                 "update_plan", "slashcommand"),
}
TOOL_CATEGORIES = {name: cat for cat, names in _CATEGORY_OF.items() for name in names}
HUMAN_REPLY = ("user_reply", "human")  # the wait for the user's next message: name, category
JOB_CATEGORY = "coding-agent"  # as the generated long-context sessions (long_context.py)
DEFAULT_CHARS_PER_TOKEN = 4.0  # English text and code with BPE tokenizers, roughly


def tool_category(name: str) -> str:
    """The category of a tool name: MCP tools (``mcp__server__tool``) are ``mcp``; names
    not in the map are ``other``."""
    low = name.lower()
    if low.startswith("mcp__"):
        return "mcp"
    return TOOL_CATEGORIES.get(low, "other")


def parse_time(text: object, where: str, field: str = "timestamp") -> float:
    """An ISO 8601 time as Unix seconds (a naive one is taken as UTC)."""
    if not isinstance(text, str):
        raise TraceError(f"{where}: field {field!r} must be an ISO 8601 time, got {text!r}")
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(f"{where}: field {field!r} is not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def estimate_tokens(chars: int, chars_per_token: float) -> int:
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


@dataclass
class Call:
    """One model call of a session, as the converters read it from a log."""

    output_tokens: int
    context_tokens: int | None  # the call's whole input, when the log reports it
    user_chars: int  # new user text sent with the call
    result_chars: int  # tool results sent with the call
    ready_s: float | None  # when its input was complete (the last user message/tool result)
    done_s: float | None  # when its response was complete
    tool_name: str | None = None  # the tool(s) it called, None for none
    tool_category: str | None = None
    tool_s: float | None = None  # the tools' own measured time; None: up to the next call


@dataclass
class Options:
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    max_wait_s: float | None = None  # cap on a tool or human wait (a user back next morning)
    time_scale: float = 1.0  # span files: wall seconds per trace second

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ValueError(f"--tokenizer-ratio must be positive, got {self.chars_per_token}")
        if self.max_wait_s is not None and not self.max_wait_s >= 0:
            raise ValueError(f"--max-wait-s must be >= 0, got {self.max_wait_s}")
        if not self.time_scale > 0:
            raise ValueError(f"--time-scale must be positive, got {self.time_scale}")


def _wait(call: Call, nxt: Call, opts: Options) -> float:
    if call.tool_name is not None and call.tool_s is not None:
        wait = call.tool_s
    elif call.done_s is not None and nxt.ready_s is not None:
        wait = nxt.ready_s - call.done_s
    else:
        wait = 0.0
    wait = max(0.0, wait)
    return min(wait, opts.max_wait_s) if opts.max_wait_s is not None else wait


def build_job(job_id: str, calls: list[Call], arrival_s: float | None, opts: Options,
              where: str, category: str = JOB_CATEGORY) -> JobTrace:
    """One job from its calls in order. A call's new prompt is the growth of the model's
    input since the previous call (its input plus output) when the log reports input sizes,
    else the new text over `chars_per_token`; the tool results' share of it becomes the
    previous tool's `result_tokens`. Between a call without tools and the next one the user
    was typing: that wait is a ``human`` tool call."""
    if not calls:
        raise TraceError(f"{where}: no model calls")
    cpt = opts.chars_per_token
    news = []
    for k, call in enumerate(calls):
        prev = calls[k - 1] if k else None
        if call.context_tokens is not None and (prev is None or prev.context_tokens is not None):
            grown = call.context_tokens - (prev.context_tokens + prev.output_tokens if prev else 0)
            news.append(max(0, grown))  # a compaction shrinks the context
        else:
            news.append(estimate_tokens(call.user_chars + call.result_chars, cpt))
    segments = []
    for k, call in enumerate(calls):
        new = news[k]
        prompt = new
        if k + 1 < len(calls):
            nxt = calls[k + 1]
            result = min(news[k + 1], estimate_tokens(nxt.result_chars, cpt))
            if call.tool_name is not None:
                tool = ToolCall(call.tool_name, call.tool_category or tool_category(call.tool_name),
                                _wait(call, nxt, opts), result)
            else:
                tool = ToolCall(*HUMAN_REPLY, _wait(call, nxt, opts), result)
            news[k + 1] -= result
        else:
            tool = None
        if k == 0:
            prompt = max(1, prompt)  # the native format needs a prompt to start from
        segments.append(Segment(prompt, max(1, call.output_tokens), tool))
    return JobTrace(job_id, tuple(segments), arrival_s, category)


def rebase_arrivals(jobs: list[JobTrace]) -> list[JobTrace]:
    """Arrivals relative to the earliest one, jobs sorted by arrival (unknown ones last)."""
    known = [j.arrival_s for j in jobs if j.arrival_s is not None]
    t0 = min(known) if known else 0.0
    out = [j if j.arrival_s is None else j.with_id(j.job_id, j.arrival_s - t0) for j in jobs]
    return sorted(out, key=lambda j: (j.arrival_s is None, j.arrival_s or 0.0))


def unique_ids(jobs: Iterable[JobTrace]) -> list[JobTrace]:
    """Job ids made unique with a ``~n`` suffix (the same session in two inputs)."""
    seen: Counter[str] = Counter()
    out = []
    for job in jobs:
        seen[job.job_id] += 1
        n = seen[job.job_id]
        out.append(job if n == 1 else job.with_id(f"{job.job_id}~{n}", job.arrival_s))
    return out


def summary(fmt: str, jobs: list[JobTrace], notes: Iterable[str] = ()) -> str:
    """A few lines for stderr: jobs, segments, tool calls by category with their mean time."""
    tools = [s.tool for j in jobs for s in j.segments if s.tool]
    by: dict[str, list[float]] = {}
    for t in tools:
        by.setdefault(t.category, []).append(t.duration_s)
    lines = [f"{fmt}: {len(jobs)} jobs, {sum(len(j.segments) for j in jobs)} segments, "
             f"{len(tools)} tool calls, {sum(j.total_tokens for j in jobs)} tokens in all"]
    for cat, ds in sorted(by.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {cat:<10}{len(ds):>7} calls, mean {sum(ds) / len(ds):.3g} s")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
