"""Per-job records and the summary a benchmark row reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astraea.profile import HardwareProfile
from astraea.workloads.trace import JobTrace


@dataclass
class JobRecord:
    job_id: str
    category: str
    arrival_s: float
    finish_s: float = float("nan")
    idle_jct_s: float = float("nan")
    api_s: float = 0.0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    final_context_tokens: int = 0  # the scheduler's count when the job finished

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def slowdown(self) -> float:
        return self.jct_s / self.idle_jct_s

    @property
    def normalized_latency_s(self) -> float:
        """InferCept's metric: seconds per output token, API time excluded."""
        return (self.jct_s - self.api_s) / max(self.output_tokens, 1)


def idle_jct_s(job: JobTrace, profile: HardwareProfile) -> float:
    """The job's JCT alone on an idle engine that preserves its KV: the physical limit.

    Mirrors the simulated engine step by step: prefill in chunks of the token budget (each
    reading the context before it), the last chunk sampling the first token, then one decode
    step per further token reading the whole context.
    """
    t, context = 0.0, 0
    budget = profile.max_num_batched_tokens
    # A decode step's time, `profile.step_time_s(1, c)` term for term (so the same floats)
    # without a call per token: long-context jobs decode thousands of tokens.
    one, k = profile.non_attention_ms(1), profile.k_ms_per_context_token
    for i, seg in enumerate(job.segments):
        new = job.new_tokens_before(i)
        to_prefill = max(new, 1)
        while to_prefill > 0:
            chunk = min(to_prefill, budget)
            t += profile.step_time_s(chunk, context + new - to_prefill)
            to_prefill -= chunk
        context += new
        for c in range(context, context + seg.output_tokens - 1):
            t += (one + k * c) / 1e3
        context += seg.output_tokens
        if seg.tool:
            t += seg.tool.duration_s
    return t


def summarize(records: list[JobRecord], makespan_s: float) -> dict:
    done = [r for r in records if r.finish_s == r.finish_s]  # not NaN
    if not done:
        return {"jobs_completed": 0}
    jct = np.array([r.jct_s for r in done])
    return {
        "jobs_completed": len(done),
        "mean_jct_s": float(jct.mean()),
        "p50_jct_s": float(np.percentile(jct, 50)),
        "p90_jct_s": float(np.percentile(jct, 90)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "max_jct_s": float(jct.max()),
        "mean_slowdown": float(np.mean([r.slowdown for r in done])),
        # No scheduler can beat the idle-engine JCT; mean JCT minus it is what scheduling adds.
        "mean_idle_jct_s": float(np.mean([r.idle_jct_s for r in done])),
        "normalized_latency_s_per_token": float(np.mean([r.normalized_latency_s for r in done])),
        "mean_ttft_s": float(np.mean([t for r in done for t in r.ttft_s])) if any(r.ttft_s for r in done) else 0.0,
        "throughput_jobs_per_s": len(done) / makespan_s if makespan_s > 0 else 0.0,
    }
