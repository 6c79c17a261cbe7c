"""Scheduler overhead: one batch build at N ready jobs, and one event of each kind.

The scheduler under test is the real core with the chosen policy, a busy worker with room for
a few admissions per build (200 free KV blocks, 4 free sequence slots: steady state), jobs spread over the MLFQ levels. After each
build the admitted jobs end their segment with a tool call and return, so the ready count
stays at N. Times are wall-clock per call (perf_counter_ns), median and p99.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from astraea.plan import JobState, WorkerView
from astraea.profile import load_profile
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import build_scheduler

WARMUP = 20  # builds not timed: first calls pay for lazy imports and cold caches


def _view(profile, free_blocks: int, free_slots: int = 4) -> WorkerView:
    """A busy worker: `free_blocks` of KV and `free_slots` sequence slots left."""
    return WorkerView(worker_id=0, total_blocks=profile.kv_capacity_blocks, free_blocks=free_blocks,
                      block_size=profile.block_size, host_free_blocks=profile.host_swap_blocks,
                      running_seqs=profile.max_num_seqs - free_slots, max_seqs=profile.max_num_seqs,
                      running_context_tokens=100_000, step_time_s=0.03, step_index=0)


def _stats(samples_ns: list[int]) -> dict:
    a = np.array(samples_ns) / 1e6
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)),
            "samples": len(a)}


def measure(policy: str = "astraea", profile_name: str = "gptj-6b-a100",
            sizes: tuple[int, ...] = (100, 1000, 10000), builds: int = 1000, seed: int = 0) -> dict:
    profile = load_profile(profile_name)
    rng = np.random.default_rng(seed)
    out: dict = {"policy": policy, "profile": profile_name, "build": {}, "events": {}}
    for n in sizes:
        est = OnlineJobEstimator()
        sched = build_scheduler(policy, profile, est)
        now = 0.0
        arrive_ns, end_ns, return_ns, build_ns = [], [], [], []
        for i in range(n):
            now += 0.001
            t0 = time.perf_counter_ns()
            job = sched.job_arrived(f"j{i}", now, "qa")
            # Spread jobs over the MLFQ levels, as a loaded system has them.
            job.level = int(rng.integers(0, sched.config.mlfq.num_levels))
            sched.segment_submitted(f"j{i}", now, int(rng.integers(200, 2000)), "qa")
            arrive_ns.append(time.perf_counter_ns() - t0)
        gc.collect()
        gc.freeze()  # as a long-running service does after start-up: long-lived objects leave GC scans
        for b in range(builds + WARMUP):
            now += 0.01
            view = _view(profile, free_blocks=200)  # room for a few jobs
            t0 = time.perf_counter_ns()
            actions = sched.build_plan(now, {0: view})
            if b >= WARMUP:
                build_ns.append(time.perf_counter_ns() - t0)
            for a in actions:
                job = sched.jobs[a.job_id]
                if job.state is not JobState.RUNNING:
                    continue
                now += 0.001
                t0 = time.perf_counter_ns()
                sched.segment_ended(a.job_id, now, 40, a.new_tokens, True, "qa", _view(profile, 400))
                end_ns.append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                sched.segment_submitted(a.job_id, now + 0.5, 50, "qa")
                return_ns.append(time.perf_counter_ns() - t0)
        out["build"][n] = _stats(build_ns)
        if n == sizes[-1] or n == 1000:
            out["events"][n] = {"arrival": _stats(arrive_ns), "segment_end": _stats(end_ns),
                                "api_return": _stats(return_ns)}
    return out


def format_overhead(res: dict) -> str:
    lines = [f"scheduler overhead, policy {res['policy']} ({res['profile']})",
             f"{'what':<32}{'median ms':>10}{'p99 ms':>10}{'samples':>9}"]
    for n, s in res["build"].items():
        lines.append(f"{'batch build, ' + str(n) + ' ready jobs':<32}{s['median_ms']:>10.4f}{s['p99_ms']:>10.4f}{s['samples']:>9}")
    for n, ev in res["events"].items():
        for name, s in ev.items():
            lines.append(f"{name + ', ' + str(n) + ' ready jobs':<32}{s['median_ms']:>10.4f}{s['p99_ms']:>10.4f}{s['samples']:>9}")
    return "\n".join(lines)
