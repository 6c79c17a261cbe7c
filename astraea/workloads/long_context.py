"""Long-context coding-agent sessions, generated: the shape of Claude Code / SWE-agent runs.

A coding agent working on a repository issue (SWE-bench style) starts from a large prompt — its
system prompt, the tool schemas, the issue and the files it was given or has read — and then
runs dozens of short tool calls (read a file, grep, edit, run a command or the tests), each
answered by a small result, each followed by a short model turn that mostly writes the next
call. The context therefore starts large and grows slowly. What users of such agents report,
and what this generator draws, per session:

* first prompt: 15k–120k tokens, log-uniform (Claude Code sessions on SWE-bench reach contexts
  of about 116k tokens; a 15k floor is a system prompt with tool schemas and the issue alone);
* tool calls: dozens — normal, mean 30, standard deviation 12, clipped to 4–80;
* each call's kind: 70% file tools (read, grep, glob, edit: 0.02–0.3 s), 30% shell commands
  (builds, tests: 0.3–5 s), durations log-uniform inside each range, so the whole span
  0.02–5 s occurs and the predictor can learn per tool category;
* each model turn: log-normal output, mean 150 tokens (a tool call with a line or two of
  reasoning), clipped to 8–2,000;
* each tool result: log-normal, mean 400 tokens (a file excerpt, grep lines, a test summary),
  clipped to 10–4,000;
* the whole session stays within the model's context window: calls are dropped from the end,
  then the first prompt shrinks, until prompt + outputs + results fit (with a 1% margin).

Assumed, not measured: the split between file and shell tools, the means and spreads of
outputs and results (coefficient of variation 1, read as log-normal), and that sessions are
independent. Arrivals are Poisson at `qps` when given, as for the InferCept mix.
"""

from __future__ import annotations

import math

import numpy as np

from astraea.workloads.trace import JobTrace, Segment, ToolCall

CATEGORY = "coding-agent"
PROMPT_TOKENS = (15_000, 120_000)  # log-uniform range of the first prompt
CALLS = (30.0, 12.0, 4, 80)  # mean, standard deviation, min, max
# (name, tool category, share of calls, duration range in seconds, log-uniform)
TOOLS = (
    ("read_file", "file", 0.70, (0.02, 0.3)),
    ("bash", "shell", 0.30, (0.3, 5.0)),
)
OUTPUT_TOKENS = (150.0, 8, 2_000)  # log-normal mean, min, max
RESULT_TOKENS = (400.0, 10, 4_000)
CV = 1.0
WINDOW_MARGIN = 0.99  # keep sessions a little under the window


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lognormal_int(rng: np.random.Generator, mean: float, lo: int, hi: int) -> int:
    sigma2 = math.log(1 + CV**2)
    x = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))
    return int(min(max(round(x), lo), hi))


def generate_session(rng: np.random.Generator, job_id: str, context_window: int) -> JobTrace:
    """One coding-agent session whose total context stays under `context_window`."""
    limit = int(context_window * WINDOW_MARGIN)
    prompt = round(_log_uniform(rng, *PROMPT_TOKENS))
    mean, std, lo, hi = CALLS
    calls = int(min(max(round(rng.normal(mean, std)), lo), hi))
    outputs = [_lognormal_int(rng, *OUTPUT_TOKENS) for _ in range(calls + 1)]
    results = [_lognormal_int(rng, *RESULT_TOKENS) for _ in range(calls)]
    shares = np.array([t[2] for t in TOOLS])
    kinds = rng.choice(len(TOOLS), size=calls, p=shares / shares.sum())
    durations = [_log_uniform(rng, *TOOLS[k][3]) for k in kinds]
    # Fit the window: drop calls from the end while the tail alone is too long, then shrink
    # the prompt (a smaller repository context), never below one token.
    while calls > 0 and sum(outputs) + sum(results) >= limit:
        calls -= 1
        outputs.pop()
        results.pop()
    outputs[-1] = max(1, min(outputs[-1], limit - 1 - sum(outputs[:-1]) - sum(results)))
    prompt = max(1, min(prompt, limit - sum(outputs) - sum(results)))
    segments = []
    for i in range(calls + 1):
        tool = None
        if i < calls:
            name, category, _, _ = TOOLS[kinds[i]]
            tool = ToolCall(name, category, durations[i], results[i])
        segments.append(Segment(prompt if i == 0 else 0, outputs[i], tool))
    return JobTrace(job_id, tuple(segments), None, CATEGORY)


def generate_long_context(num_jobs: int, seed: int, qps: float | None = None,
                          context_window: int = 131_072) -> list[JobTrace]:
    """`num_jobs` coding-agent sessions; Poisson arrivals at `qps` if given."""
    if num_jobs < 1:
        raise ValueError("num_jobs must be at least 1")
    if qps is not None and qps <= 0:
        raise ValueError("qps must be positive")
    if context_window < 2:
        raise ValueError("context_window must be at least 2 tokens")
    rng = np.random.default_rng([seed, 31337])
    jobs, t = [], 0.0
    for i in range(num_jobs):
        job = generate_session(rng, f"c{i}", context_window)
        if qps is not None:
            t += float(rng.exponential(1.0 / qps))
            job = job.with_id(job.job_id, t)
        jobs.append(job)
    return jobs
