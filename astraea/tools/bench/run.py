"""Run policies side by side on the same workloads: the matrix behind `astraea bench`."""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from astraea.profile import load_profile
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import GENERATED, load_trace, take_jobs, with_poisson_arrivals
from astraea.workloads.trace import JobTrace
from control_plane.core.config import SchedulerConfig
from control_plane.core.policies import POLICIES


@dataclass(frozen=True)
class BenchSpec:
    workload: str  # a generated workload ("infercept", "long-context") or a trace file
    profile: str
    policies: tuple[str, ...]
    qps: tuple[float | None, ...]  # None: the trace's own arrivals
    jobs: int
    seeds: tuple[int, ...]
    predictor: str = "online"
    num_workers: int = 1
    overrides: dict = field(default_factory=dict)
    prediction_error: tuple[float, ...] = (0.0,)  # σ of the log-normal factor on estimates
    # GPU KV blocks per worker (None: the profile's). A pool no job's context could outgrow
    # measures what the rest costs (batching, queueing) with memory out of the picture.
    kv_blocks: int | None = None

    def to_dict(self) -> dict:
        return {
            "workload": self.workload, "profile": self.profile, "policies": list(self.policies),
            "qps": list(self.qps), "jobs": self.jobs, "seeds": list(self.seeds),
            "predictor": self.predictor, "num_workers": self.num_workers,
            "overrides": dict(self.overrides), "prediction_error": list(self.prediction_error),
            "kv_blocks": self.kv_blocks,
        }


def validate(spec: BenchSpec) -> None:
    unknown = [p for p in spec.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    if spec.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if any(q is not None and q <= 0 for q in spec.qps):
        raise ValueError("--qps values must be positive")
    if not spec.prediction_error or any(
            not (s >= 0 and math.isfinite(s)) for s in spec.prediction_error):
        raise ValueError("--prediction-error values must be finite numbers >= 0")
    if spec.kv_blocks is not None and spec.kv_blocks < 1:
        raise ValueError("--kv-blocks must be at least 1")
    SchedulerConfig().with_overrides(spec.overrides)
    load_profile(spec.profile)


def workload_jobs(spec: BenchSpec, qps: float | None, seed: int) -> list[JobTrace]:
    profile = load_profile(spec.profile)
    if spec.workload in GENERATED:
        return GENERATED[spec.workload](spec.jobs, seed, qps=qps,
                                        context_window=profile.context_window)
    jobs = take_jobs(load_trace(spec.workload), spec.jobs, profile.context_window)
    if all(j.arrival_s is not None for j in jobs):
        return jobs  # the trace's own arrivals; --qps does not apply
    if qps is None:
        raise ValueError(f"{spec.workload} has no arrival times: give --qps")
    return with_poisson_arrivals(jobs, qps, seed)


def run_one(spec: BenchSpec, policy: str, qps: float | None, seed: int,
            sigma: float = 0.0) -> dict:
    profile = load_profile(spec.profile)
    jobs = workload_jobs(spec, qps, seed)
    config = SchedulerConfig().with_overrides(spec.overrides)
    def progress(done: int, total: int) -> None:
        # Long runs (thousands of jobs) say how far they are, a line every 2,000 jobs.
        if done % 2000 == 0 and done < total:
            label = "trace" if qps is None else f"{qps:g}"
            print(f"  {policy} qps={label} seed={seed}: {done}/{total} jobs done",
                  file=sys.stderr, flush=True)

    sim = Simulation(jobs, profile, policy, num_workers=spec.num_workers,
                     predictor=spec.predictor, config=config, progress=progress,
                     prediction_error=sigma, error_seed=seed, kv_blocks=spec.kv_blocks)
    result = sim.run()
    counts = result.decision_counts
    return {
        "policy": policy, "qps": qps, "seed": seed, "prediction_error": sigma,
        **result.summary,
        "jobs": len(jobs),
        # By action, whether decided at the tool call or reclaimed for a ready job later.
        "kv_preserve": counts.get("preserve", 0),
        "kv_swap": counts.get("swap", 0) + counts.get("reclaim_swap", 0),
        "kv_discard": counts.get("discard", 0) + counts.get("reclaim_discard", 0),
        "kv_reclaimed": counts.get("reclaim_swap", 0) + counts.get("reclaim_discard", 0),
        "preemptions": result.engine_counters["preemptions"],
        "tokens_recomputed": result.engine_counters["tokens_recomputed"],
        "tokens_swapped_out": result.engine_counters["tokens_swapped_out"],
        "peak_kv_utilization": result.peak_kv_utilization,
        "sim_wall_s": result.wall_s,
    }


def _run_task(args):
    return run_one(*args)


def run_matrix(spec: BenchSpec, parallel: int | None = None, log=None) -> list[dict]:
    """Every (qps, seed, policy) run; the same jobs for every policy at a (qps, seed).
    Progress goes to `log` (default: the current stderr)."""
    validate(spec)
    log = log if log is not None else sys.stderr
    tasks = [(spec, p, q, s, e) for e in spec.prediction_error for q in spec.qps
             for s in spec.seeds for p in spec.policies]
    parallel = max(1, min(parallel or os.cpu_count() or 1, len(tasks)))
    runs: list[dict] = []
    started = time.perf_counter()

    def note(run: dict) -> None:
        runs.append(run)
        qps = "trace" if run["qps"] is None else f"{run['qps']:g}"
        sigma = f" sigma={run['prediction_error']:g}" if run["prediction_error"] else ""
        print(f"[{len(runs)}/{len(tasks)}] {run['policy']} qps={qps} seed={run['seed']}{sigma}: "
              f"mean JCT {run.get('mean_jct_s', float('nan')):.2f} s "
              f"({run['sim_wall_s']:.1f} s simulated in wall time, "
              f"{time.perf_counter() - started:.0f} s elapsed)", file=log, flush=True)
        unfinished = run["jobs"] - run.get("jobs_completed", 0)
        if unfinished:
            # A job whose context outgrows every worker's KV pool never runs; the figures
            # above cover only the finished jobs, which must not pass unnoticed.
            print(f"  warning: {unfinished} of {run['jobs']} jobs never finished "
                  f"({run['policy']}); the JCT figures cover only the finished ones",
                  file=log, flush=True)

    if parallel == 1:
        for t in tasks:
            note(run_one(*t))
    else:
        with ProcessPoolExecutor(parallel) as pool:
            for fut in as_completed([pool.submit(_run_task, t) for t in tasks]):
                note(fut.result())
    order = {(p, q, s, e): i for i, (_, p, q, s, e) in enumerate(tasks)}
    runs.sort(key=lambda r: order[(r["policy"], r["qps"], r["seed"], r["prediction_error"])])
    return runs
