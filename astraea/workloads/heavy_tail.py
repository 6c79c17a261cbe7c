"""Heavy-tailed tool latencies: five tool categories whose means span 1,000x, each log-normal.

The InferCept mix has narrow spreads inside each category (a coefficient of variation below
one), so a per-category mean predicts a call well. Real tools are not like that: the same web
search or test run takes 50 ms or 50 s. This generator keeps InferCept-like jobs (context
about 1,400 tokens, a few calls, short outputs) and draws every call from one of five
categories with log-spaced means, 0.05 s to 50 s, and a log-normal spread σ (1 to 2, default
1.5; σ = 1.5 puts a call's p99 near 13x its mean and its median at a third of it):

| category   | mean s | what it stands for             |
|------------|-------:|--------------------------------|
| cache      |  0.05  | a key-value or file lookup     |
| search     |  0.28  | a search API                   |
| code       |  1.58  | running a snippet              |
| browse     |  8.9   | fetching and reading pages     |
| job        |  50    | a build, a test suite, a query |

Assumed (no trace measured): categories drawn uniformly per job (a job's calls share one
tool category, like an InferCept job); calls per job normal(5, 2.5), at least 1; the job's
context normal(1400, 700) tokens, clipped to [64, window]; outputs log-normal, mean 40
tokens, and results log-normal, mean 60, both with a coefficient of variation of 0.5.
"""

from __future__ import annotations

import math

import numpy as np

from astraea.workloads.trace import JobTrace, Segment, ToolCall

# (category, tool name, mean duration in seconds): log-spaced, 1,000x from first to last.
CATEGORIES = (
    ("cache", "kv_lookup", 0.05),
    ("search", "web_search", 0.05 * 10 ** 0.75),
    ("code", "run_snippet", 0.05 * 10 ** 1.5),
    ("browse", "fetch_page", 0.05 * 10 ** 2.25),
    ("job", "run_tests", 50.0),
)
CALLS = (5.0, 2.5)  # normal mean, standard deviation (at least one call)
CONTEXT_TOKENS = (1400.0, 700.0)
OUTPUT_TOKENS = 40.0
RESULT_TOKENS = 60.0
CV = 0.5
MIN_PROMPT = 32
SIGMA_RANGE = (1.0, 2.0)


def _lognormal_mean(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """Log-normal with the given mean and log-space standard deviation σ."""
    return float(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))


def _tokens(rng: np.random.Generator, mean: float) -> int:
    sigma = math.sqrt(math.log(1 + CV * CV))
    return max(1, round(_lognormal_mean(rng, mean, sigma)))


def generate_heavy_tail(num_jobs: int, seed: int, qps: float | None = None,
                        context_window: int = 4096, sigma: float = 1.5) -> list[JobTrace]:
    """`num_jobs` jobs with heavy-tailed tool calls; Poisson arrivals at `qps` if given."""
    if num_jobs < 1:
        raise ValueError("num_jobs must be at least 1")
    if qps is not None and qps <= 0:
        raise ValueError("qps must be positive")
    if not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
        raise ValueError(f"sigma must be in [{SIGMA_RANGE[0]}, {SIGMA_RANGE[1]}], got {sigma}")
    if context_window < 4 * MIN_PROMPT:
        raise ValueError(f"context_window must be at least {4 * MIN_PROMPT} tokens")
    rng = np.random.default_rng([seed, 4243])
    jobs, t = [], 0.0
    for i in range(num_jobs):
        category, tool, mean_s = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        calls = max(1, round(rng.normal(*CALLS)))
        target = int(np.clip(rng.normal(*CONTEXT_TOKENS), 2 * MIN_PROMPT, context_window))
        outputs = [_tokens(rng, OUTPUT_TOKENS) for _ in range(calls + 1)]
        results = [_tokens(rng, RESULT_TOKENS) for _ in range(calls)]
        durations = [_lognormal_mean(rng, mean_s, sigma) for _ in range(calls)]
        while calls > 1 and MIN_PROMPT + sum(outputs) + sum(results) > context_window:
            calls -= 1  # a long job loses its last calls to fit the window
            outputs.pop()
            results.pop()
            durations.pop()
        prompt = max(MIN_PROMPT, target - sum(outputs) - sum(results))
        prompt = min(prompt, context_window - sum(outputs) - sum(results))
        segments = tuple(
            Segment(prompt if k == 0 else 0, outputs[k],
                    ToolCall(tool, category, durations[k], results[k]) if k < calls else None)
            for k in range(calls + 1))
        job = JobTrace(f"h{i}", segments, None, category)
        if qps is not None:
            t += float(rng.exponential(1.0 / qps))
            job = job.with_id(job.job_id, t)
        jobs.append(job)
    return jobs
