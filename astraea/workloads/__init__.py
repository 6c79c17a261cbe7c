"""Agent workloads: generated mixes and trace files (native JSONL, InferCept JSON)."""

from __future__ import annotations

from pathlib import Path

from astraea.workloads.chat import generate_chat
from astraea.workloads.generator import INFERCEPT_MIX, generate_mix, with_poisson_arrivals
from astraea.workloads.heavy_tail import generate_heavy_tail
from astraea.workloads.infercept_format import read_infercept
from astraea.workloads.long_context import generate_long_context
from astraea.workloads.native import read_native, write_native
from astraea.workloads.tiny_agent import generate_tiny_agent
from astraea.workloads.trace import JobTrace, Segment, ToolCall, TraceError

__all__ = [
    "GENERATED", "INFERCEPT_MIX", "JobTrace", "Segment", "ToolCall", "TraceError", "generate_mix",
    "generate_long_context", "generate_heavy_tail", "generate_chat", "generate_tiny_agent",
    "load_trace", "read_infercept", "read_native", "with_poisson_arrivals", "write_native",
    "take_jobs",
]

# The generated workloads by the name `--workload`/`trace gen --shape` take; each is called as
# f(num_jobs, seed, qps=..., context_window=...).
GENERATED = {
    "infercept": generate_mix,  # the InferCept agent mix (generator.py)
    "long-context": generate_long_context,  # coding-agent sessions (long_context.py)
    "heavy-tail": generate_heavy_tail,  # 5 tool categories, log-normal σ 1.5 (heavy_tail.py)
    "chat": generate_chat,  # conversations with minutes-long human replies (chat.py)
    "tiny-agent": generate_tiny_agent,  # bench-vllm's jobs, for the small models (tiny_agent.py)
}


def load_trace(path: str | Path) -> list[JobTrace]:
    """Read a native JSONL or an InferCept JSON trace: a first line that is a whole job
    object makes it JSONL, anything else is read as one InferCept JSON document."""
    import json

    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "segments" in obj:
        return read_native(path)
    return read_infercept(path)


def take_jobs(jobs: list[JobTrace], n: int, context_window: int | None = None) -> list[JobTrace]:
    """The first `n` jobs in file order, cycling with fresh ids (and shifted arrivals) when
    `n` exceeds the file; a job longer than the context window is an error naming it."""
    if context_window is not None:
        for job in jobs:
            if job.total_tokens > context_window:
                raise TraceError(
                    f"job {job.job_id!r} reaches {job.total_tokens} tokens, more than the "
                    f"profile's context window of {context_window}")
    timed = all(j.arrival_s is not None for j in jobs)
    span = 0.0
    if timed:
        first, last = min(j.arrival_s for j in jobs), max(j.arrival_s for j in jobs)
        span = (last - first) * (1 + 1 / max(len(jobs) - 1, 1)) if len(jobs) > 1 else 1.0
    out = []
    for i in range(n):
        cycle, k = divmod(i, len(jobs))
        job = jobs[k]
        if cycle == 0:
            out.append(job)
            continue
        arrival = job.arrival_s + cycle * span if timed else None
        out.append(job.with_id(f"{job.job_id}~{cycle}", arrival))
    return out
