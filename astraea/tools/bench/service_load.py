"""`astraea bench-service`: the control plane under load, on loopback, with simulated workers.

    astraea bench-service --jobs 1000 --seconds 20 --out docs/results/service-load.json

Three kinds of OS process, so that only the control plane's own work counts against it:

* **the control plane**: the real `control_plane.service.server.serve` (AgentService,
  WorkerService streams, the planner, the health service), with the same telemetry and log
  set-up as `astraea-control-plane`, run by `python -m astraea.tools.bench.service_host`.
  Its stdin takes two commands from the benchmark: ``reset`` starts a
  measurement window of its `ServiceStats` (see `control_plane/service/stats.py`), ``stats``
  answers with them as one JSON line; EOF stops it.
* **N simulated workers**: `astraea-worker` processes (real `SimulatedBackend`, real gRPC
  streams), started by `astraea.tools.stack.Stack`. Their profile is GPT-J-6B/A100 with the step
  limits raised so that they are not the bottleneck (`max_num_seqs` large enough for every job
  in flight, a 8,192-token step budget) and `--kv-blocks` large enough that memory never binds
  (this measures the control plane, not the engine).
* **the load generator**: this process. `--jobs` concurrent job loops through the real client
  (`AsyncAgentClient` over one grpc.aio channel). Each job runs `--segments-per-job` segments:
  RunSegment (`--prompt-tokens` prompt, `--tokens` output tokens, a tool-call hint) → the
  client's ``tool_call`` (ReportToolCall START, sleep `--tool-ms`, ReportToolCall END) → the
  next segment …; the last segment has no tool call, then EndJob, and a new job takes its
  place, so `--jobs` jobs are always in flight.

What is measured, over `--seconds` after `--warmup` seconds:

* **segment event** = one segment completed end to end: its RunSegment was submitted, every
  one of its tokens streamed back, and its done event reached the client. ``segments/s`` is
  these per second. Every segment's tokens are checked: all arrive, in order, and equal to
  what the simulated engine generates (`worker.sim.backend.placeholder_token`).
* **control-plane events** = every message that reached the control plane: RunSegment calls,
  ReportToolCall calls, StartJob and EndJob calls, and every WorkerMessage on the worker
  streams (token batches, segment ends, memory reports, step reports, preemptions). Counted by
  the control plane itself, per kind.
* **plan latency** (event → queued): on the control plane, from the first event that marks the
  planner dirty to the moment the plan's messages are queued on the worker streams; it includes
  waiting for the event loop to reach the planner. **build_plan**: `Scheduler.build_plan`
  alone. Both for the plans caused by events in the window.
* **client segment latency**: RunSegment call to its done event, in the load generator.
* CPU % of each process over the window (100 % = one core), from getrusage (control plane,
  load generator) and /proc (workers), and the load average, since the machine is shared;
  and the control plane's CPU per completed segment, which is what bounds its throughput on
  one core (its Python code runs on one thread).

`--grpc-floor` runs the same load against an AgentService whose handlers only answer (one
token event per token, then done), with no scheduler and no workers: the cost of the gRPC
calls alone, the floor under any Python grpc.aio control plane for this client API.
`--cprofile FILE` profiles the control plane's event loop over the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PROFILE = "gptj-6b-a100"
PLACEHOLDER_ID = 1


@dataclass
class ServiceBenchConfig:
    jobs: int = 1000  # jobs in flight
    seconds: float = 20.0  # measured window
    warmup: float = 5.0
    workers: int = 2
    policy: str = "astraea"
    profile: str = DEFAULT_PROFILE  # the base profile; its step limits are raised (see above)
    time_scale: float = 0.1  # wall seconds per engine second, control plane and workers
    tokens: int = 4  # output tokens per segment
    prompt_tokens: int = 8  # new prompt tokens per segment
    segments_per_job: int = 8
    tool_ms: float = 2.0  # wall time of each simulated tool call
    tool_reports: bool = True  # False (diagnostic): no ReportToolCall around the tool call
    kv_blocks: int = 200_000  # per worker
    log_level: str = "info"  # the control plane's (info: as it ships)
    log_dir: str | None = None
    cprofile: str | None = None  # write a cProfile of the control plane's window here
    grpc_floor: bool = False  # an empty AgentService instead of the control plane, no workers
    state_dir: str | None = None  # the control plane's --state-dir (None: in memory)
    # The control plane's --max-unfinished-jobs (0: its default); more jobs in flight than
    # it allows would be refused at StartJob.
    max_unfinished_jobs: int = 0
    database: str | None = None  # or its --database (a postgresql:// URL)
    store_writer: str = "process"  # its --store-writer (SQLite)

    def check(self) -> None:
        if self.jobs < 1 or self.workers < 1 or self.segments_per_job < 1:
            raise ValueError("--jobs, --workers and --segments-per-job must be at least 1")
        if self.tokens < 1 or self.prompt_tokens < 1:
            raise ValueError("--tokens and --prompt-tokens must be at least 1")
        if not (self.seconds > 0 and self.warmup >= 0 and self.time_scale > 0
                and self.tool_ms >= 0):
            raise ValueError("--seconds and --time-scale must be positive, --warmup and "
                             "--tool-ms not negative")


class _Host:
    """The control-plane host subprocess and its command channel."""

    def __init__(self, cfg: ServiceBenchConfig, profile_path: str, log_dir: Path) -> None:
        args = [sys.executable, "-m", "astraea.tools.bench.service_host",
                "--policy", cfg.policy, "--profile", profile_path,
                "--time-scale", repr(cfg.time_scale), "--log-level", cfg.log_level]
        if cfg.cprofile:
            args += ["--cprofile", str(Path(cfg.cprofile).resolve())]
        if cfg.grpc_floor:
            args.append("--grpc-floor")
        if cfg.state_dir:
            args += ["--state-dir", str(Path(cfg.state_dir).resolve())]
        elif cfg.database:
            args += ["--state-dir", cfg.database]  # serve() takes a URL there too
        if cfg.max_unfinished_jobs:
            args += ["--max-unfinished-jobs", str(cfg.max_unfinished_jobs)]
        args += ["--store-writer", cfg.store_writer]
        self.log = log_dir / "control-plane.log"
        with open(self.log, "wb") as err:
            self.popen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True, start_new_session=True)
        try:
            first = self._read(timeout_s=60)
        except BaseException:
            self.popen.kill()
            self.popen.wait()
            raise
        self.port = first["port"]
        self.pid = self.popen.pid

    def _read(self, timeout_s: float = 30) -> dict:
        import selectors

        from astraea.tools.stack import StackError, log_tail

        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout_s):
                raise StackError(f"the control plane did not answer within {timeout_s:g} s; "
                                 f"see {self.log}")
        finally:
            sel.close()
        line = self.popen.stdout.readline()
        if not line:
            raise StackError(f"the control plane exited (code {self.popen.poll()}); the last "
                             f"lines of {self.log}:\n{log_tail(self.log)}")
        return json.loads(line)

    def command(self, cmd: str) -> dict:
        self.popen.stdin.write(cmd + "\n")
        self.popen.stdin.flush()
        return self._read()

    def stop(self) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


# --- measurements in the load generator -----------------------------------------------------

def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class _Window:
    """What the load generator counts; reset at the start of the measured window."""

    started: float = field(default_factory=time.monotonic)
    segments: int = 0
    tokens: int = 0
    jobs_started: int = 0
    jobs_ended: int = 0
    tool_calls: int = 0
    token_events: int = 0  # RunSegment token events received (several tokens may share one)
    latency_s: list[float] = field(default_factory=list)
    in_flight_samples: list[int] = field(default_factory=list)
    in_segment_samples: list[int] = field(default_factory=list)


class _Load:
    def __init__(self, cfg: ServiceBenchConfig, address: str) -> None:
        self.cfg = cfg
        self.address = address
        self.window = _Window()
        self.in_flight = 0  # started, not ended
        self.in_segment = 0  # RunSegment outstanding
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []
        self.bad_tokens = 0  # segments whose tokens were missing, out of order or wrong
        self._seq = 0

    def _error(self, e: BaseException) -> None:
        kind = type(e).__name__
        code = getattr(e, "code", None)
        if code is not None and hasattr(code, "name"):
            kind += ":" + code.name
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(str(e)[:300])

    async def _job(self, client, job_id: str, segments: int) -> None:
        from astraea.client import FinishReason
        from worker.sim.backend import placeholder_token

        cfg = self.cfg
        prompt = [PLACEHOLDER_ID] * cfg.prompt_tokens
        await client.start_job(job_id, "bench")
        self.in_flight += 1
        self.window.jobs_started += 1
        try:
            for i in range(segments):
                last = i == segments - 1
                t0 = time.perf_counter()
                self.in_segment += 1
                try:
                    stream = client.stream_segment(job_id, prompt_token_ids=prompt,
                                                   max_tokens=cfg.tokens, temperature=0.0,
                                                   next_tool_category=None if last else "bench")
                    chunks = 0
                    async for _ in stream:
                        chunks += 1
                    res = stream.result
                finally:
                    self.in_segment -= 1
                took = time.perf_counter() - t0
                # The client checked the indices are contiguous; check the ids are the
                # simulated engine's and that all of them came.
                if res.tokens != [placeholder_token(job_id, k) for k in range(cfg.tokens)]:
                    self.bad_tokens += 1
                w = self.window
                w.segments += 1
                w.tokens += len(res.tokens)
                w.token_events += chunks
                w.latency_s.append(took)
                expected = FinishReason.LENGTH if last else FinishReason.TOOL_CALL
                if res.finish_reason is not expected:
                    raise RuntimeError(f"job {job_id} segment {i}: finish reason "
                                       f"{res.finish_reason}, expected {expected}")
                if last:
                    break
                if cfg.tool_reports:
                    async with client.tool_call(job_id, "bench"):
                        if cfg.tool_ms:
                            await asyncio.sleep(cfg.tool_ms / 1e3)
                elif cfg.tool_ms:
                    await asyncio.sleep(cfg.tool_ms / 1e3)
                self.window.tool_calls += 1
            await client.end_job(job_id)
            self.window.jobs_ended += 1
        finally:
            self.in_flight -= 1

    async def _slot(self, client, slot: int, stop: asyncio.Event) -> None:
        # The slots' first jobs have 1 … segments_per_job segments, so that job starts and
        # ends are spread evenly over time instead of coming in waves.
        segments = slot % self.cfg.segments_per_job + 1
        while not stop.is_set():
            self._seq += 1
            try:
                await self._job(client, f"s{slot}-{self._seq}", segments)
                segments = self.cfg.segments_per_job
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - counted and reported; the slot goes on
                self._error(e)
                await asyncio.sleep(0.05)

    async def _sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            self.window.in_flight_samples.append(self.in_flight)
            self.window.in_segment_samples.append(self.in_segment)

    async def run(self, on_window_start, on_window_end) -> tuple[_Window, float]:
        """Warm up, reset the counters (and call `on_window_start`), measure, call
        `on_window_end`, stop. Returns the window and its length in seconds."""
        import grpc

        from astraea.client import AsyncAgentClient

        cfg = self.cfg
        stop = asyncio.Event()
        # One HTTP/2 connection carries every job, as one agent front end would.
        channel = grpc.aio.insecure_channel(self.address)
        client = AsyncAgentClient(channel=channel)
        tasks = [asyncio.create_task(self._slot(client, s, stop)) for s in range(cfg.jobs)]
        sampler = asyncio.create_task(self._sample(stop))
        try:
            await asyncio.sleep(cfg.warmup)
            await asyncio.get_running_loop().run_in_executor(None, on_window_start)
            self.window = _Window()
            self.error_examples.clear()
            self.errors.clear()
            self.bad_tokens = 0
            await asyncio.sleep(cfg.seconds)
            window = self.window
            elapsed = time.monotonic() - window.started
            self.window = _Window()  # what finishes after the window is not counted
            await asyncio.get_running_loop().run_in_executor(None, on_window_end)
            return window, elapsed
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            sampler.cancel()
            await asyncio.gather(*tasks, sampler, return_exceptions=True)
            await channel.close()


def _bench_profile(cfg: ServiceBenchConfig, log_dir: Path) -> str:
    """The workers' (and control plane's) profile: the base one with step limits raised."""
    from astraea.profile import BUILTIN_PROFILES

    if cfg.profile in BUILTIN_PROFILES:
        from importlib import resources

        data = json.loads(resources.files("astraea.profiles").joinpath(
            f"{cfg.profile}.json").read_text())
    else:
        data = json.loads(Path(cfg.profile).read_text())
    per_worker = -(-cfg.jobs // cfg.workers)
    data["max_num_seqs"] = max(int(data.get("max_num_seqs", 256)), min(per_worker + 8, 8192))
    data["max_num_batched_tokens"] = max(int(data.get("max_num_batched_tokens", 384)), 8192,
                                         data["max_num_seqs"])
    data["name"] = f"{data['name']}-bench-service"
    data.setdefault("sources", {})["bench-service"] = (
        "astraea bench-service raised max_num_seqs and max_num_batched_tokens so that the "
        "simulated workers are not the bottleneck")
    path = log_dir / "bench-profile.json"
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def run(cfg: ServiceBenchConfig, log=None) -> dict:
    """Run the benchmark; the report (see `format_report`)."""
    import tempfile

    from astraea.tools.stack import Stack, StackConfig

    cfg.check()
    log = log if log is not None else sys.stderr
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(
        tempfile.mkdtemp(prefix="astraea-bench-service-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    profile_path = _bench_profile(cfg, log_dir)
    server = ("an empty AgentService (--grpc-floor)" if cfg.grpc_floor else
              f"control plane ({cfg.policy}), {cfg.workers} simulated workers")
    print(f"bench-service: {server}, "
          f"{cfg.jobs} jobs in flight; warm-up {cfg.warmup:g} s, window {cfg.seconds:g} s; "
          f"logs in {log_dir}", file=log, flush=True)
    host = _Host(cfg, profile_path, log_dir)
    stack = None
    try:
        address = f"127.0.0.1:{host.port}"
        worker_pids = []
        if not cfg.grpc_floor:
            stack = Stack(StackConfig(profile=profile_path, time_scale=cfg.time_scale,
                                      workers=cfg.workers, kv_blocks=cfg.kv_blocks,
                                      log_dir=str(log_dir),  # workers log at info: the
                                      # stack sees them register in their logs
                                      connect_control_plane=address, predictor=False))
            stack.start()
            worker_pids = [p for n, p in stack.pids.items() if n.startswith("worker-")]
        marks: dict = {}

        def start_window() -> None:
            marks["cp_reset"] = host.command("reset")
            marks["load0"] = os.getloadavg()
            marks["self_cpu0"] = _self_cpu_s()
            marks["workers_cpu0"] = [_proc_cpu_s(p) for p in worker_pids]
            marks["t0"] = time.monotonic()

        def end_window() -> None:
            marks["cp"] = host.command("stats")
            marks["t1"] = time.monotonic()
            marks["self_cpu1"] = _self_cpu_s()
            marks["workers_cpu1"] = [_proc_cpu_s(p) for p in worker_pids]
            marks["load1"] = os.getloadavg()

        load = _Load(cfg, address)
        window, elapsed = asyncio.run(load.run(start_window, end_window))
    finally:
        if stack is not None:
            stack.stop()
        host_code = host.stop()
    span = marks["t1"] - marks["t0"]
    cp = marks["cp"]
    events = cp["events"]
    cp_s = cp["elapsed_s"]
    from control_plane.service.stats import summarize_ms

    worker_cpu = [100 * (b - a) / span for a, b in zip(marks["workers_cpu0"],
                                                       marks["workers_cpu1"])]

    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    report = {
        "config": asdict(cfg),
        "definitions": {
            "segment_event": "one segment completed end to end: RunSegment submitted, all its "
                             "tokens streamed back in order, done received by the client",
            "control_plane_events": "every message reaching the control plane: RunSegment, "
                                    "ReportToolCall, StartJob, EndJob calls and every "
                                    "WorkerMessage on the worker streams",
            "plan_latency": "first event marking the planner dirty -> the plan's messages "
                            "queued on the worker streams (control plane clock)",
            "build_plan": "Scheduler.build_plan wall time alone",
        },
        "window_s": elapsed,
        "segments": window.segments,
        "segments_per_s": window.segments / elapsed,
        "tokens_per_s": window.tokens / elapsed,
        "token_events_per_segment": (window.token_events / window.segments
                                     if window.segments else math.nan),
        "jobs_started": window.jobs_started,
        "jobs_ended": window.jobs_ended,
        "tool_calls": window.tool_calls,
        "jobs_in_flight_mean": mean(window.in_flight_samples),
        "segments_in_flight_mean": mean(window.in_segment_samples),
        "control_plane_events": sum(events.values()),
        "control_plane_events_per_s": sum(events.values()) / cp_s,
        "control_plane_events_by_kind": dict(sorted(events.items())),
        "worker_bundles": cp.get("bundles", 0),
        "plans": cp["plans"],
        "plans_per_s": cp["plans"] / cp_s,
        "plans_with_actions": cp["plans_with_actions"],
        "plan_latency": cp["plan_latency"],
        "build_plan": cp["build_plan"],
        "client_segment_latency": summarize_ms(window.latency_s),
        # CPU the control plane spent per completed segment, and the segments/s one fully
        # busy core would give at that cost (an extrapolation, labelled as such).
        "control_plane_cpu_ms_per_segment": (
            1e3 * (cp["cpu_s"] + cp.get("children_cpu_s", 0.0)) / window.segments
            if window.segments else math.nan),
        "control_plane_gc": cp.get("gc"),
        "cpu_percent": {"control_plane": cp["cpu_percent"],
                        "control_plane_children": 100 * cp.get("children_cpu_s", 0.0) / cp_s,
                        "load_generator": 100 * (marks["self_cpu1"] - marks["self_cpu0"]) / span,
                        "workers": worker_cpu},
        "loadavg_start": list(marks["load0"]),
        "loadavg_end": list(marks["load1"]),
        "cpus": os.cpu_count(),
        "errors": dict(load.errors),
        "error_examples": list(load.error_examples),
        "bad_token_segments": load.bad_tokens,
        "exit_codes": {**(stack.exit_codes if stack else {}), "control-plane": host_code},
        "log_dir": str(log_dir),
    }
    return _no_nan(report)


def _no_nan(obj):
    """NaN (a figure with no samples) as None, so the JSON is strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def _num(x, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def format_report(r: dict) -> str:
    c = r["config"]
    pl, bp, cl = r["plan_latency"], r["build_plan"], r["client_segment_latency"]
    cpu = r["cpu_percent"]
    what = (f"{c['workers']} workers, policy {c['policy']}" if not c.get("grpc_floor") else
            "GRPC FLOOR: empty AgentService handlers, no workers, no scheduler")
    lines = [
        f"bench-service: {c['jobs']} jobs in flight, {what}, "
        f"{c['segments_per_job']} segments/job x {c['tokens']} tokens, "
        f"tool {c['tool_ms']:g} ms{'' if c['tool_reports'] else ' (not reported)'}, time "
        f"scale {c['time_scale']:g}, {r['window_s']:.1f} s window, state "
        + ("in memory" if not (c.get("state_dir") or c.get("database")) else
           "PostgreSQL" if c.get("database") else
           f"SQLite (statements in a {c.get('store_writer', 'thread')})"),
        f"load average {' '.join(f'{x:.2f}' for x in r['loadavg_start'])} (start), "
        f"{' '.join(f'{x:.2f}' for x in r['loadavg_end'])} (end), {r['cpus']} CPUs",
        "",
        f"{'what':<44}{'value':>14}",
        f"{'segments/s completed (segment events)':<44}{r['segments_per_s']:>14,.0f}",
        f"{'control-plane events/s (all messages in)':<44}{r['control_plane_events_per_s']:>14,.0f}",
        f"{'tokens/s streamed to clients':<44}{r['tokens_per_s']:>14,.0f}",
        f"{'token events per segment (stream messages)':<44}"
        f"{_num(r['token_events_per_segment'], '.2f', 14)}",
        f"{'plans/s (event-driven)':<44}{r['plans_per_s']:>14,.0f}",
        f"{'control-plane CPU ms per segment':<44}"
        f"{_num(r['control_plane_cpu_ms_per_segment'], '.3f', 14)}",
        f"{'jobs in flight (mean)':<44}{_num(r['jobs_in_flight_mean'], ',.0f', 14)}",
        f"{'segments in flight (mean)':<44}{_num(r['segments_in_flight_mean'], ',.0f', 14)}",
        "",
        f"{'latency ms':<30}{'p50':>9}{'p99':>9}{'max':>9}{'samples':>10}",
    ]
    for name, s in (("plan, event -> queued", pl), ("build_plan", bp),
                    ("client segment (RunSegment)", cl)):
        lines.append(f"{name:<30}{_num(s['p50_ms'], '.3f', 9)}{_num(s['p99_ms'], '.3f', 9)}"
                     f"{_num(s['max_ms'], '.2f', 9)}{s['count']:>10,}")
    lines += [
        "",
        f"CPU % (100 = one core): control plane {cpu['control_plane']:.0f}"
        + (f" (and its store process {cpu['control_plane_children']:.0f})"
           if cpu.get("control_plane_children") else "")
        + f", load generator "
        f"{cpu['load_generator']:.0f}, workers "
        + ", ".join(f"{x:.0f}" for x in cpu["workers"]),
        "control-plane events by kind: " + ", ".join(
            f"{k} {v:,}" for k, v in r["control_plane_events_by_kind"].items())
        + f"; {r['worker_bundles']:,} worker writes were bundles of several",
    ]
    if r["errors"] or r["bad_token_segments"]:
        lines.append(f"ERRORS: {r['errors']}; segments with wrong tokens: "
                     f"{r['bad_token_segments']}; e.g. {r['error_examples'][:2]}")
    return "\n".join(lines)
