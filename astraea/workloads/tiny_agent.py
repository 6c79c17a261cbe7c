"""Tiny agents: the InferCept mix scaled down to the project's own small models.

`astraea bench-vllm` replays it live on a real vLLM engine; `astraea bench --workload
tiny-agent` replays the same jobs in the simulator (with the profile measured on that engine
and its small KV pool), so the two can be set side by side.

Each job has a category of the InferCept mix and a first prompt of 32-200 tokens, 2-4 tool
calls, 8-48 output tokens per segment and 8-32 result tokens per tool. It keeps the mix's
shape (several paused segments per job, tools of different lengths per category) but not its
sizes: contexts of a few hundred tokens instead of ~1,500, and tool calls of 0.1-1.0 s
instead of 0.1 ms-30 s, so that 36 jobs run in about a minute per policy on two CPU cores
and fit a 2,048-token window. Seeded with Python's `random` (the sequence bench-vllm has
used since it was written: its recorded runs stay reproducible).
"""

from __future__ import annotations

import random

from astraea.workloads.trace import JobTrace, Segment, ToolCall

# Category -> (tool name, tool duration range in s): the InferCept categories, with durations
# squeezed into 0.1-1.0 s in the order of the paper's means (calculator fastest).
TOOLS: dict[str, tuple[str, float, float]] = {
    "math": ("calculator", 0.1, 0.2),
    "ve": ("virtual_env", 0.1, 0.3),
    "qa": ("wikipedia", 0.3, 0.7),
    "image": ("image_gen", 0.5, 1.0),
    "tts": ("text_to_speech", 0.5, 1.0),
    "chatbot": ("human_reply", 0.6, 1.0),
}
PROMPT_TOKENS = (32, 200)
OUTPUT_TOKENS = (8, 48)
RESULT_TOKENS = (8, 32)
TOOL_CALLS = (2, 4)
# The longest job: the largest first prompt, results and outputs.
MAX_JOB_TOKENS = (PROMPT_TOKENS[1] + TOOL_CALLS[1] * RESULT_TOKENS[1]
                  + (TOOL_CALLS[1] + 1) * OUTPUT_TOKENS[1])


def generate_tiny_agent(num_jobs: int, seed: int, qps: float | None = None,
                        context_window: int = 2048) -> list[JobTrace]:
    """`num_jobs` seeded tiny agent jobs; Poisson arrivals at `qps` if given."""
    if num_jobs < 1:
        raise ValueError("num_jobs must be at least 1")
    if qps is not None and not qps > 0:
        raise ValueError("qps must be positive")
    if context_window < MAX_JOB_TOKENS:
        raise ValueError(f"context_window must be at least {MAX_JOB_TOKENS} tokens")
    rng = random.Random(seed)
    categories = sorted(TOOLS)
    jobs, t = [], 0.0
    for i in range(num_jobs):
        category = rng.choice(categories)
        tool, lo, hi = TOOLS[category]
        calls = rng.randint(*TOOL_CALLS)
        segments = []
        for k in range(calls + 1):
            call = None
            if k < calls:
                call = ToolCall(tool, category, round(rng.uniform(lo, hi), 3),
                                rng.randint(*RESULT_TOKENS))
            segments.append(Segment(rng.randint(*PROMPT_TOKENS) if k == 0 else 0,
                                    rng.randint(*OUTPUT_TOKENS), call))
        # Drawn with or without `qps`, so that both give the same jobs (expovariate(qps) is
        # this draw over qps, the sequence bench-vllm's runs were recorded with).
        gap = rng.expovariate(1.0)
        arrival = None
        if qps is not None:
            t += gap / qps
            arrival = round(t, 4)
        jobs.append(JobTrace(f"j{i}", tuple(segments), arrival, category))
    return jobs
