"""The InferCept agent mix, generated from per-category distributions (docs/design.md).

What the paper's Table 1 gives per category (mean, spread): API time, API calls per job and
the job's context tokens. What it does not give — how a context splits into the first prompt,
the outputs of each segment and each tool's result — is our assumption, written below per
category and chosen to be plausible for the tool (a calculator returns a number, Wikipedia a
passage, a virtual environment a short observation, a human a chat turn). Spreads are read as
standard deviations. Durations are log-normal with the table's mean and spread (positive,
right-skewed); counts and token lengths are normal or log-normal, clipped to sensible ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from astraea.workloads.trace import JobTrace, Segment, ToolCall


@dataclass(frozen=True)
class CategorySpec:
    name: str
    tool: str
    api_time_s: tuple[float, float]
    api_calls: tuple[float, float]
    context_tokens: tuple[float, float]
    # Our assumptions (not in the paper's table): mean tokens per segment output and per
    # tool result; both log-normal with a coefficient of variation of 0.5.
    output_tokens: float
    result_tokens: float


INFERCEPT_MIX: tuple[CategorySpec, ...] = (
    CategorySpec("math", "calculator", (9e-5, 6e-5), (3.75, 1.3), (1422, 738), 40, 8),
    CategorySpec("qa", "wikipedia", (0.69, 0.17), (2.52, 1.73), (1846, 428), 40, 120),
    CategorySpec("ve", "virtual_env", (0.09, 0.014), (28.18, 15.2), (2185, 115), 12, 25),
    CategorySpec("chatbot", "human_reply", (28.6, 15.6), (4.45, 1.96), (753, 703), 80, 40),
    CategorySpec("image", "image_gen", (20.03, 7.8), (6.91, 3.93), (1247, 792), 40, 10),
    CategorySpec("tts", "text_to_speech", (17.24, 7.6), (6.91, 3.93), (1251, 792), 40, 10),
)
MIN_PROMPT = 32
CV = 0.5


def _lognormal(rng: np.random.Generator, mean: float, std: float) -> float:
    sigma2 = math.log(1 + (std / mean) ** 2)
    return float(rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)))


def generate_job(rng: np.random.Generator, spec: CategorySpec, job_id: str,
                 context_window: int) -> JobTrace:
    calls = max(1, round(rng.normal(*spec.api_calls)))
    target = int(np.clip(rng.normal(*spec.context_tokens), 2 * MIN_PROMPT, context_window))
    outputs = [max(1, round(_lognormal(rng, spec.output_tokens, CV * spec.output_tokens)))
               for _ in range(calls + 1)]
    results = [max(1, round(_lognormal(rng, spec.result_tokens, CV * spec.result_tokens)))
               for _ in range(calls)]
    # Long jobs that would overflow the window lose their last tool calls.
    while calls > 1 and MIN_PROMPT + sum(outputs) + sum(results) > context_window:
        calls -= 1
        outputs.pop()
        results.pop()
    prompt = max(MIN_PROMPT, target - sum(outputs) - sum(results))
    segments = []
    for i in range(calls + 1):
        tool = None
        if i < calls:
            duration = _lognormal(rng, *spec.api_time_s)
            tool = ToolCall(spec.tool, spec.name, duration, results[i])
        segments.append(Segment(prompt if i == 0 else 0, outputs[i], tool))
    return JobTrace(job_id, tuple(segments), None, spec.name)


def generate_mix(num_jobs: int, seed: int, qps: float | None = None,
                 context_window: int = 4096,
                 mix: tuple[CategorySpec, ...] = INFERCEPT_MIX) -> list[JobTrace]:
    """`num_jobs` jobs, categories drawn uniformly; Poisson arrivals at `qps` if given."""
    if num_jobs < 1:
        raise ValueError("num_jobs must be at least 1")
    if qps is not None and qps <= 0:
        raise ValueError("qps must be positive")
    rng = np.random.default_rng(seed)
    jobs, t = [], 0.0
    for i in range(num_jobs):
        spec = mix[int(rng.integers(len(mix)))]
        job = generate_job(rng, spec, f"j{i}", context_window)
        if qps is not None:
            t += float(rng.exponential(1.0 / qps))
            job = job.with_id(job.job_id, t)
        jobs.append(job)
    return jobs


def with_poisson_arrivals(jobs: list[JobTrace], qps: float, seed: int) -> list[JobTrace]:
    rng = np.random.default_rng([seed, 7919])
    t, out = 0.0, []
    for job in jobs:
        t += float(rng.exponential(1.0 / qps))
        out.append(job.with_id(job.job_id, t))
    return out
