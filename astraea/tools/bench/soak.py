"""`astraea bench-soak`: thousands of concurrent jobs against simulated workers for minutes,
then the gRPC floor under the same load, in one run.

    astraea bench-soak --jobs 5000 --minutes 10 --out docs/results/soak.json

It reuses `astraea bench-service`'s pieces (`service_load`): the same control-plane host
process (the real `serve`, with the telemetry and logging `astraea-control-plane` ships with),
the same simulated workers with raised step limits, and the same job loop (StartJob, segments
of `--prompt-tokens` in and `--tokens` out, each followed by a reported tool call of
`--tool-ms`, EndJob; every token checked against the engine's). What it adds:

* **Admission sized for the load.** The control plane is started with
  `--max-unfinished-jobs` above `--jobs`, so no job is refused; a refusal would still be
  counted as a failure, never dropped.
* **A long window, read in intervals.** Every `--interval` seconds the control plane answers
  with its counters and its raw plan latencies and starts the next interval, so the
  percentiles over the whole window are exact and a drift shows in the per-interval timeline.
* **Every job completed.** After the window no new job starts; the jobs in flight run to
  their end (up to `--drain-timeout`). Jobs started must equal jobs completed, with no
  errors and no wrong tokens, on the client and on the control plane's own counts.
* **Control-plane memory.** Its resident set (/proc/PID/status VmRSS), read every 0.5 s:
  idle before the load, after the warm-up, the peak, at the end of the window and after the
  drain; and its change over the window's second half, which is what "flat" means here (the
  finished jobs it keeps for GetJob are bounded by count and age, see `limits.py`).
* **The floor, in the same run.** `bench-service --grpc-floor` with the same job shape,
  once the soak's processes are gone, at `--floor-jobs` in flight (default: the soak's, at
  most 1,000, where an empty AgentService is already saturated); the report gives the
  soak's segments/s as a fraction of it.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from astraea.tools.bench.service_load import (
    DEFAULT_PROFILE,
    ServiceBenchConfig,
    _bench_profile,
    _Host,
    _Load,
    _no_nan,
    _num,
    _proc_cpu_s,
    _self_cpu_s,
)

FLOOR_TARGET = 0.8  # soak segments/s as a fraction of the floor's, the goal
PLAN_P99_TARGET_MS = 5.0


@dataclass
class SoakConfig:
    jobs: int = 5000  # jobs in flight
    minutes: float = 10.0  # measured window
    warmup: float = 20.0  # seconds before the window (the first jobs' StartJob burst)
    interval: float = 30.0  # seconds between reads of the control plane's counters
    drain_timeout: float = 600.0  # seconds the jobs in flight get to finish after the window
    workers: int = 2
    policy: str = "astraea"
    profile: str = DEFAULT_PROFILE
    time_scale: float = 0.1
    tokens: int = 4
    prompt_tokens: int = 8
    segments_per_job: int = 8
    tool_ms: float = 2.0
    kv_blocks: int = 200_000
    log_level: str = "info"
    floor_seconds: float = 30.0  # the floor's window (0: no floor measurement)
    floor_warmup: float = 10.0
    # Jobs in flight against the floor (0: as many as the soak, at most 1,000). An empty
    # AgentService is saturated well below 1,000 (bench-service's figure); at 5,000 on a
    # 2-core host at load average 30 it stalled instead (10 segments/s, its process at 2 %
    # CPU, the load generator at 10 %), which measures no floor.
    floor_jobs: int = 0
    log_dir: str | None = None
    cprofile: str | None = None  # a cProfile of the control plane from the window's start

    def check(self) -> None:
        if not (self.minutes > 0 and self.interval > 0 and self.drain_timeout > 0):
            raise ValueError("--minutes, --interval and --drain-timeout must be positive")
        if self.floor_seconds < 0 or self.floor_warmup < 0 or self.floor_jobs < 0:
            raise ValueError("--floor-seconds, --floor-warmup and --floor-jobs must not be "
                             "negative")
        self.service_config().check()

    def max_unfinished_jobs(self) -> int:
        # Headroom over the jobs in flight: a job's EndJob and its successor's StartJob may
        # overlap; 4096 is the control plane's default.
        return max(4096, self.jobs + self.jobs // 10 + 64)

    def service_config(self, **changes) -> ServiceBenchConfig:
        """The `bench-service` configuration of the same load."""
        base = dict(jobs=self.jobs, seconds=self.minutes * 60, warmup=self.warmup,
                    workers=self.workers, policy=self.policy, profile=self.profile,
                    time_scale=self.time_scale, tokens=self.tokens,
                    prompt_tokens=self.prompt_tokens, segments_per_job=self.segments_per_job,
                    tool_ms=self.tool_ms, kv_blocks=self.kv_blocks, log_level=self.log_level,
                    log_dir=self.log_dir, max_unfinished_jobs=self.max_unfinished_jobs(),
                    cprofile=self.cprofile)
        base.update(changes)
        return ServiceBenchConfig(**base)


def rss_bytes(pid: int) -> int | None:
    """A process's resident set size (VmRSS), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _SoakLoad(_Load):
    """`bench-service`'s job loop, kept running for the soak and then drained."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()
        # Per call and status: how many, when first and last (s since the start), one message.
        self.errors_by_call: dict[str, dict] = {}

    def _error(self, e: BaseException) -> None:
        super()._error(e)
        text = str(e)
        code = getattr(getattr(e, "code", None), "name", type(e).__name__)
        key = f"{text.split(':', 1)[0]}:{code}" if ":" in text else code
        at = round(time.monotonic() - self.started, 1)
        seen = self.errors_by_call.setdefault(key, {"count": 0, "first_s": at,
                                                    "example": text[:300]})
        seen["count"] += 1
        seen["last_s"] = at

    async def soak(self, host: _Host, cfg: SoakConfig) -> dict:
        import grpc

        from astraea.client import AsyncAgentClient

        loop = asyncio.get_running_loop()
        rss: list[tuple[float, int]] = []  # (monotonic s, bytes)
        marks: dict = {"rss_idle": rss_bytes(host.pid), "load_start": os.getloadavg()}

        async def sample_rss() -> None:
            while True:
                value = rss_bytes(host.pid)
                if value is not None:
                    rss.append((time.monotonic(), value))
                await asyncio.sleep(0.5)

        def read_interval() -> dict:
            snap = host.command("interval")
            w = self.window
            snap["client"] = {"segments": w.segments, "tokens": w.tokens,
                              "jobs_started": w.jobs_started, "jobs_ended": w.jobs_ended}
            snap["rss_bytes"] = rss_bytes(host.pid)
            snap["at"] = time.monotonic()
            return snap

        stop = asyncio.Event()
        channel = grpc.aio.insecure_channel(self.address)
        client = AsyncAgentClient(channel=channel)
        sampler = asyncio.create_task(sample_rss())
        in_flight = asyncio.create_task(self._sample(stop))
        tasks = [asyncio.create_task(self._slot(client, s, stop)) for s in range(cfg.jobs)]
        intervals: list[dict] = []
        try:
            await asyncio.sleep(cfg.warmup)
            warm = await loop.run_in_executor(None, read_interval)
            marks.update(t0=warm["at"], cpu0=_self_cpu_s(), rss_warm=warm["rss_bytes"])
            self.window.in_flight_samples.clear()
            end = warm["at"] + cfg.minutes * 60
            while (left := end - time.monotonic()) > 0.05:
                await asyncio.sleep(min(cfg.interval, left))
                intervals.append(await loop.run_in_executor(None, read_interval))
            marks.update(t1=time.monotonic(), cpu1=_self_cpu_s(), load_end=os.getloadavg(),
                         jobs_in_flight_mean=_mean(self.window.in_flight_samples))
            # Drain: no new jobs; the ones in flight run to their end.
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout)
            marks["drain_s"] = time.monotonic() - marks["t1"]
            marks["not_drained"] = len(pending)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            drained = await loop.run_in_executor(None, read_interval)
            marks["rss_drained"] = drained["rss_bytes"]
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            sampler.cancel()
            in_flight.cancel()
            await asyncio.gather(*tasks, sampler, in_flight, return_exceptions=True)
            await channel.close()
        return {"warm": warm, "intervals": intervals, "drained": drained, "rss": rss,
                "marks": marks}


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def run(cfg: SoakConfig, log=None) -> dict:
    """The soak, then the floor; the report (see `format_report`)."""
    import tempfile

    from astraea.tools.bench import service_load
    from astraea.tools.stack import Stack, StackConfig
    from control_plane.service.stats import summarize_ms

    cfg.check()
    log = log if log is not None else sys.stderr
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(
        tempfile.mkdtemp(prefix="astraea-bench-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    scfg = cfg.service_config(log_dir=str(log_dir))
    profile_path = _bench_profile(scfg, log_dir)
    print(f"bench-soak: {cfg.jobs} jobs in flight on {cfg.workers} simulated workers for "
          f"{cfg.minutes:g} min after {cfg.warmup:g} s of warm-up; logs in {log_dir}",
          file=log, flush=True)
    host = _Host(scfg, profile_path, log_dir)
    stack = None
    try:
        address = f"127.0.0.1:{host.port}"
        stack = Stack(StackConfig(profile=profile_path, time_scale=cfg.time_scale,
                                  workers=cfg.workers, kv_blocks=cfg.kv_blocks,
                                  log_dir=str(log_dir), connect_control_plane=address,
                                  predictor=False))
        stack.start()
        worker_pids = [p for n, p in stack.pids.items() if n.startswith("worker-")]
        load = _SoakLoad(scfg, address)
        workers_cpu0 = [_proc_cpu_s(p) for p in worker_pids]
        soak = asyncio.run(load.soak(host, cfg))
        workers_cpu1 = [_proc_cpu_s(p) for p in worker_pids]
    finally:
        if stack is not None:
            stack.stop()
        host_code = host.stop()

    floor = None
    if cfg.floor_seconds > 0:
        print(f"bench-soak: the gRPC floor, {cfg.floor_jobs or min(cfg.jobs, 1000)} jobs, "
              f"{cfg.floor_seconds:g} s",
              file=log, flush=True)
        floor = service_load.run(cfg.service_config(
            jobs=cfg.floor_jobs or min(cfg.jobs, 1000), log_dir=str(log_dir / "floor"),
            grpc_floor=True, seconds=cfg.floor_seconds, warmup=cfg.floor_warmup,
            cprofile=None), log=log)

    m, intervals = soak["marks"], soak["intervals"]
    window_s = m["t1"] - m["t0"]
    segments = intervals[-1]["client"]["segments"] - soak["warm"]["client"]["segments"]
    tokens = intervals[-1]["client"]["tokens"] - soak["warm"]["client"]["tokens"]
    events: dict[str, int] = {}
    cp_elapsed = cp_cpu = 0.0
    plan_samples: list[float] = []
    for snap in intervals:
        for kind, n in snap["events"].items():
            events[kind] = events.get(kind, 0) + n
        cp_elapsed += snap["elapsed_s"]
        cp_cpu += snap["cpu_s"]
        plan_samples += snap["plan_latency_samples_s"]
    plans = sum(s["plans"] for s in intervals)
    built = sum(s["build_plan"]["count"] for s in intervals)
    build_mean_ms = (sum(s["build_plan"]["mean_ms"] * s["build_plan"]["count"]
                         for s in intervals if s["build_plan"]["count"]) / built
                     if built else math.nan)
    # The control plane's own job counts over the whole run: warm-up, window and drain.
    cp_jobs: dict[str, int] = {"start_job": 0, "end_job": 0}
    for snap in [soak["warm"], *intervals, soak["drained"]]:
        for kind in cp_jobs:
            cp_jobs[kind] += snap["events"].get(kind, 0)
    client = soak["drained"]["client"]
    failures = sum(load.errors.values()) + load.bad_tokens
    # The peak is the largest reading of all: the 0.5 s samples and the readings at the marks
    # (taken apart from them, so one of those may be the largest).
    rss = [v for _, v in soak["rss"]] + [v for v in (m["rss_warm"], intervals[-1]["rss_bytes"],
                                                     m["rss_drained"]) if v is not None]
    window_rss = [(t, v) for t, v in soak["rss"] if m["t0"] <= t <= m["t1"]]
    half = [v for t, v in window_rss if t >= m["t0"] + window_s / 2]
    plan = summarize_ms(plan_samples)
    report = {
        "config": asdict(cfg),
        "max_unfinished_jobs": cfg.max_unfinished_jobs(),
        "window_s": window_s,
        "segments": segments,
        "segments_per_s": segments / window_s,
        "tokens_per_s": tokens / window_s,
        "control_plane_events": sum(events.values()),
        "control_plane_events_per_s": sum(events.values()) / cp_elapsed,
        "control_plane_events_by_kind": dict(sorted(events.items())),
        "plans": plans,
        "plans_per_s": plans / cp_elapsed,
        "plan_latency": plan,
        "build_plan_mean_ms": build_mean_ms,  # Scheduler.build_plan alone, the same plans
        "control_plane_cpu_ms_per_segment": (1e3 * cp_cpu / segments if segments
                                             else math.nan),
        "cpu_percent": {"control_plane": 100 * cp_cpu / cp_elapsed,
                        "load_generator": 100 * (m["cpu1"] - m["cpu0"]) / window_s,
                        "workers_whole_run": [100 * (b - a) / (m["t1"] - m["t0"] + m["drain_s"]
                                                               + cfg.warmup)
                                              for a, b in zip(workers_cpu0, workers_cpu1)]},
        "jobs_in_flight_mean": m["jobs_in_flight_mean"],
        "jobs_started": client["jobs_started"],
        "jobs_completed": client["jobs_ended"],
        "control_plane_jobs": {"started": cp_jobs["start_job"], "ended": cp_jobs["end_job"]},
        "drain_s": m["drain_s"],
        "jobs_not_drained": m["not_drained"],
        "failures": failures,
        "errors": dict(load.errors),
        "errors_by_call": load.errors_by_call,
        "error_examples": list(load.error_examples),
        "bad_token_segments": load.bad_tokens,
        "all_jobs_completed": (failures == 0 and m["not_drained"] == 0
                               and client["jobs_started"] == client["jobs_ended"]
                               == cp_jobs["start_job"] == cp_jobs["end_job"]),
        "rss_mb": {"idle": _mb(m["rss_idle"]), "after_warmup": _mb(m["rss_warm"]),
                   "peak": _mb(max(rss)) if rss else None,
                   "end_of_window": _mb(intervals[-1]["rss_bytes"]),
                   "after_drain": _mb(m["rss_drained"]),
                   "second_half_change": (_mb(half[-1] - half[0]) if len(half) > 1
                                          else None)},
        "timeline": [{"t_s": s["at"] - m["t0"], "segments": s["client"]["segments"],
                      "events": sum(s["events"].values()), "elapsed_s": s["elapsed_s"],
                      "cpu_percent": s["cpu_percent"], "plan_p99_ms": s["plan_latency"]["p99_ms"],
                      "build_plan_p99_ms": s["build_plan"]["p99_ms"],
                      "rss_mb": _mb(s["rss_bytes"])} for s in intervals],
        "loadavg_start": list(m["load_start"]),
        "loadavg_end": list(m["load_end"]),
        "cpus": os.cpu_count(),
        "exit_codes": {**stack.exit_codes, "control-plane": host_code},
        "log_dir": str(log_dir),
    }
    if floor is not None:
        report["floor"] = {k: floor[k] for k in (
            "jobs_in_flight_mean", "window_s", "segments_per_s", "control_plane_cpu_ms_per_segment", "errors",
            "loadavg_start", "loadavg_end", "cpu_percent")}
        report["floor_ratio"] = (report["segments_per_s"] / floor["segments_per_s"]
                                 if floor["segments_per_s"] else math.nan)
        report["floor_cpu_ratio"] = (floor["control_plane_cpu_ms_per_segment"]
                                     / report["control_plane_cpu_ms_per_segment"]
                                     if segments and floor["control_plane_cpu_ms_per_segment"]
                                     else math.nan)
    return _no_nan(report)


def _mb(value: int | None) -> float | None:
    return None if value is None else value / (1 << 20)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(r: dict) -> str:
    c, pl, mem = r["config"], r["plan_latency"], r["rss_mb"]
    cpu = r["cpu_percent"]
    lines = [
        f"bench-soak: {c['jobs']:,} jobs in flight, {c['workers']} workers, policy "
        f"{c['policy']}, {c['segments_per_job']} segments/job x {c['tokens']} tokens, tool "
        f"{c['tool_ms']:g} ms, time scale {c['time_scale']:g}, {r['window_s']:.0f} s window "
        f"after {c['warmup']:g} s warm-up, --max-unfinished-jobs {r['max_unfinished_jobs']:,}",
        f"load average {' '.join(f'{x:.2f}' for x in r['loadavg_start'])} (start), "
        f"{' '.join(f'{x:.2f}' for x in r['loadavg_end'])} (end of window), {r['cpus']} CPUs",
        "",
        f"{'what':<46}{'value':>14}",
        f"{'segments/s completed':<46}{r['segments_per_s']:>14,.0f}",
        f"{'control-plane events/s (all messages in)':<46}"
        f"{r['control_plane_events_per_s']:>14,.0f}",
        f"{'plans/s':<46}{r['plans_per_s']:>14,.0f}",
        f"{'plan latency p50 ms (event -> queued)':<46}{_num(pl['p50_ms'], '.3f', 14)}",
        f"{'plan latency p99 ms':<46}{_num(pl['p99_ms'], '.3f', 14)}",
        f"{'plan latency max ms':<46}{_num(pl['max_ms'], '.1f', 14)}",
        f"{'build_plan mean ms (the core alone)':<46}"
        f"{_num(r.get('build_plan_mean_ms'), '.3f', 14)}",
        f"{'control-plane CPU ms per segment':<46}"
        f"{_num(r['control_plane_cpu_ms_per_segment'], '.3f', 14)}",
        f"{'jobs in flight (mean)':<46}{_num(r['jobs_in_flight_mean'], ',.0f', 14)}",
        f"{'jobs started / completed (client)':<46}"
        f"{r['jobs_started']:>7,}/{r['jobs_completed']:<6,}",
        f"{'jobs started / ended (control plane)':<46}"
        f"{r['control_plane_jobs']['started']:>7,}/{r['control_plane_jobs']['ended']:<6,}",
        f"{'failures (errors + wrong tokens + not drained)':<46}"
        f"{r['failures'] + r['jobs_not_drained']:>14,}",
        f"{'drain after the window, s':<46}{r['drain_s']:>14.1f}",
        "",
        "control-plane RSS MB: " + ", ".join(
            f"{name.replace('_', ' ')} {_fmt(mem[name], '.0f')}"
            for name in ("idle", "after_warmup", "peak", "end_of_window", "after_drain"))
        + f"; change over the window's second half {_fmt(mem['second_half_change'], '+.1f')}",
        f"CPU % (100 = one core): control plane {cpu['control_plane']:.0f}, load generator "
        f"{cpu['load_generator']:.0f}",
    ]
    if "floor" in r:
        f = r["floor"]
        ratio = r["floor_ratio"]
        met = ratio is not None and ratio >= FLOOR_TARGET and (pl["p99_ms"] or 0) < \
            PLAN_P99_TARGET_MS
        lines += [
            "",
            f"gRPC floor (empty AgentService, same job shape, {f['jobs_in_flight_mean']:,.0f} "
            f"jobs in flight, {f['window_s']:.0f} s): "
            f"{f['segments_per_s']:,.0f} segments/s at "
            f"{_fmt(f['control_plane_cpu_ms_per_segment'], '.3f')} ms CPU per segment, "
            f"load average {f['loadavg_end'][0]:.2f}",
            f"soak / floor segments/s: {_fmt(ratio, '.2f')} (target >= {FLOOR_TARGET:g} "
            f"with plan p99 < {PLAN_P99_TARGET_MS:g} ms: {'met' if met else 'not met'}); "
            f"CPU per segment floor/soak {_fmt(r['floor_cpu_ratio'], '.2f')}",
        ]
    lines.append("")
    lines.append("ALL JOBS COMPLETED" if r["all_jobs_completed"] else
                 f"NOT ALL JOBS COMPLETED: errors {r['errors']}, wrong-token segments "
                 f"{r['bad_token_segments']}, not drained {r['jobs_not_drained']}; e.g. "
                 f"{r['error_examples'][:2]}")
    return "\n".join(lines)
