"""Chat-style agents: conversations whose waits are mostly a human typing, minutes long,
mixed with short tool calls the assistant makes between replies.

A conversation alternates assistant replies and user messages. Before each reply the
assistant may call tools (a search, a calculator, a file read): sub-second to a few seconds.
After each reply the user answers — the wait the serving system sees is the human's reading
and typing time, log-normal with a median of 60 s (σ = 1: a quarter of replies take under
30 s, one in ten over 3.5 min). Keeping a context's KV through such a wait holds memory for
minutes; dropping it costs a recompute of the whole conversation on each user turn.

Drawn per conversation (assumed, no trace measured): user turns normal(4, 2) clipped to
1-12 (each is a wait, after the assistant's reply); tool calls before each reply Poisson with
mean 1, each log-normal with median 0.3 s and σ = 1; the first prompt (system prompt and
first user message) log-normal with mean 800 tokens; assistant outputs mean 120 tokens (the
tool-call turns 30); user messages mean 60 tokens, tool results 150, all log-normal with a
coefficient of variation of 0.5. The final reply ends the conversation.
"""

from __future__ import annotations

import math

import numpy as np

from astraea.workloads.trace import JobTrace, Segment, ToolCall

CATEGORY = "chat"
HUMAN = ("user_reply", "human", 60.0, 1.0)  # tool name, category, median s, σ
TOOL = ("assistant_tool", "tool", 0.3, 1.0)
USER_TURNS = (4.0, 2.0, 1, 12)  # normal mean, standard deviation, min, max
TOOLS_PER_REPLY = 1.0  # Poisson mean
PROMPT_TOKENS = 800.0
REPLY_TOKENS = 120.0
TOOL_TURN_TOKENS = 30.0
USER_TOKENS = 60.0
TOOL_RESULT_TOKENS = 150.0
CV = 0.5


def _tokens(rng: np.random.Generator, mean: float) -> int:
    sigma = math.sqrt(math.log(1 + CV * CV))
    return max(1, round(float(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))))


def _wait(rng: np.random.Generator, spec: tuple[str, str, float, float]) -> ToolCall:
    name, category, median, sigma = spec
    return ToolCall(name, category, float(rng.lognormal(math.log(median), sigma)),
                    _tokens(rng, USER_TOKENS if category == "human" else TOOL_RESULT_TOKENS))


def generate_conversation(rng: np.random.Generator, job_id: str, context_window: int) -> JobTrace:
    mean, std, lo, hi = USER_TURNS
    turns = int(min(max(round(rng.normal(mean, std)), lo), hi))
    # (output tokens, the wait that follows): tool turns, then a reply and the user's answer.
    plan: list[tuple[int, ToolCall | None]] = []
    for turn in range(turns + 1):
        for _ in range(int(rng.poisson(TOOLS_PER_REPLY))):
            plan.append((_tokens(rng, TOOL_TURN_TOKENS), _wait(rng, TOOL)))
        last = turn == turns
        plan.append((_tokens(rng, REPLY_TOKENS), None if last else _wait(rng, HUMAN)))
    prompt = _tokens(rng, PROMPT_TOKENS)

    def total(p: list[tuple[int, ToolCall | None]]) -> int:
        return sum(out + (call.result_tokens if call else 0) for out, call in p)

    # A conversation longer than the window ends earlier: its last reply closes it.
    while len(plan) > 1 and prompt + total(plan) > context_window:
        plan.pop()
        plan[-1] = (plan[-1][0], None)
    prompt = max(1, min(prompt, context_window - total(plan)))
    segments = tuple(Segment(prompt if k == 0 else 0, out, call)
                     for k, (out, call) in enumerate(plan))
    return JobTrace(job_id, segments, None, CATEGORY)


def generate_chat(num_jobs: int, seed: int, qps: float | None = None,
                  context_window: int = 4096) -> list[JobTrace]:
    """`num_jobs` conversations; Poisson arrivals at `qps` if given."""
    if num_jobs < 1:
        raise ValueError("num_jobs must be at least 1")
    if qps is not None and qps <= 0:
        raise ValueError("qps must be positive")
    if context_window < 64:
        raise ValueError("context_window must be at least 64 tokens")
    rng = np.random.default_rng([seed, 6007])
    jobs, t = [], 0.0
    for i in range(num_jobs):
        job = generate_conversation(rng, f"chat{i}", context_window)
        if qps is not None:
            t += float(rng.exponential(1.0 / qps))
            job = job.with_id(job.job_id, t)
        jobs.append(job)
    return jobs
