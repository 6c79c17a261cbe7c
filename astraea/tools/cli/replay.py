"""`astraea replay` and `compare-live`: drive the live stack with a trace and report JCT as
`astraea bench` does, alone or beside the simulator on the same jobs."""

from __future__ import annotations

import argparse
import json
import sys

from astraea.profile import BUILTIN_PROFILES, load_profile


def add_parsers(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("replay", help="drive a live control plane with a trace; report JCT "
                                       "as 'astraea bench' does")
    _replay_args(rp, jobs_default=None, qps_default=None, ts_default=1.0)
    rp.add_argument("--control-plane", default="127.0.0.1:50051",
                    help="the control plane's address (ignored with --stack)")
    rp.add_argument("--stack", action="store_true",
                    help="start a control plane and --workers workers in this process on a free "
                         "loopback port for the replay")
    rp.add_argument("--policy-label", default="live", help="the policy name in the table")
    rp.add_argument("--http", nargs="?", const="", default=None, metavar="URL",
                    help="drive the trace through the OpenAI Chat Completions API of the gateway "
                         "at URL (e.g. http://127.0.0.1:8000/v1), one session per job; with "
                         "--stack and no URL, the stack runs as processes with a gateway")
    rp.add_argument("--model", default="astraea", help="with --http: the served model name")
    rp.add_argument("--tokenizer", default=None, metavar="PATH",
                    help="with --http: the gateway's tokenizer folder, to build prompts of the "
                         "trace's lengths (default: the tiny model's, as `astraea up --http`)")
    rp.add_argument("--api-key", default=None,
                    help="the API key sent on every call: the control plane's (a stack started "
                         "by `astraea up` prints it) or, with --http, the gateway's")
    rp.add_argument("--tls-ca", default=None, metavar="FILE",
                    help="connect to --control-plane over TLS, trusting this CA (PEM)")
    rp.add_argument("--tls-cert", default=None, metavar="FILE",
                    help="with --tls-ca: a client certificate, for a control plane that asks "
                         "for one (--tls-client-auth)")
    rp.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    rp.set_defaults(func=cmd_replay)

    cl = sub.add_parser("compare-live", help="the same jobs through the simulator and the live "
                                             "stack (in-process): mean JCT side by side")
    _replay_args(cl, jobs_default=200, qps_default=2.0, ts_default=0.05)
    cl.add_argument("--kv-blocks", type=int, default=None,
                    help="GPU KV blocks per worker, simulated and live (default: the profile's)")
    cl.add_argument("--set", dest="settings", action="append", default=[],
                    metavar="SECTION.FIELD=VALUE",
                    help="a scheduling setting, simulated and live (repeatable), e.g. --set "
                         "mlfq.num_levels=3")
    cl.add_argument("--processes", action="store_true",
                    help="run the live stack as separate processes (predictor, control plane, "
                         "workers; as `astraea up`) instead of in this process")
    cl.set_defaults(func=cmd_compare_live, workers=1)


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


def cmd_replay(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import aggregate, format_tables, write_json
    from astraea.tools.replay import run_row

    profile, jobs, qps = _replay_setup(args)
    if args.http is not None:
        where = (args.http or "a stack of processes with a gateway") + " (OpenAI API)"
    else:
        where = "an in-process stack" if args.stack else args.control_plane
    print(f"astraea replay: {len(jobs)} jobs against {where}, time scale {args.time_scale:g}",
          file=sys.stderr)
    result, counts = (_replay_http(args, jobs, profile) if args.http is not None
                      else _replay_live(args, jobs, profile))
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
                "http": args.http,
                "stack": {"policy": args.policy, "workers": args.workers} if args.stack else None,
                "concurrency": args.concurrency}
        write_json(args.out, spec, rows, [run])
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not result.errors else 1


def cmd_compare_live(args: argparse.Namespace) -> int:
    from astraea.tools.replay import run_row
    from astraea.tools.sim.simulator import Simulation

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policy: give at least one policy")
    args.stack = True
    args.control_plane = None
    from control_plane.core.config import SchedulerConfig

    args.scheduler_config = SchedulerConfig.from_settings(args.settings)
    profile, jobs, qps = _replay_setup(args)
    where = "separate processes" if args.processes else "one process"
    print(f"astraea compare-live: {len(jobs)} jobs, {', '.join(policies)}, {args.workers} "
          f"workers, profile {args.profile}, time scale {args.time_scale:g}, live stack in "
          f"{where}", file=sys.stderr)
    results, decisions = {}, {}
    for policy in policies:
        sim = Simulation(jobs, profile, policy, num_workers=args.workers,
                         config=args.scheduler_config, kv_blocks=args.kv_blocks).run()
        print(f"  [{policy}] simulator: mean JCT {sim.summary.get('mean_jct_s', float('nan')):.2f}"
              f" s ({sim.wall_s:.1f} s wall); live ...", file=sys.stderr, flush=True)
        args.policy = policy
        live, counts = (_live_in_processes(args, policy, jobs, profile) if args.processes
                        else _replay_live(args, jobs, profile))
        live_row = run_row(live, "live", qps, args.seed, len(jobs), counts)
        results[policy] = (sim.summary, live_row, live)
        decisions[policy] = (dict(sim.decision_counts), counts)
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
    # Where live departs from the simulator, the KV decisions usually show why (memory
    # seen fuller or emptier than it was when a decision landed).
    print("KV decisions, simulator / live:")
    for policy, (sim_counts, live_counts) in decisions.items():
        keys = sorted(set(sim_counts) | set(live_counts or {}))
        cells = [f"{k} {sim_counts.get(k, 0)} / "
                 f"{'?' if live_counts is None else live_counts.get(k, 0)}" for k in keys]
        print(f"  {policy:<14}{', '.join(cells) or 'none'}")
        out[policy]["kv_decisions"] = {"simulator": sim_counts, "live": live_counts}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"policies": out, "jobs": len(jobs), "qps": qps, "seed": args.seed,
                       "time_scale": args.time_scale, "workers": args.workers,
                       "kv_blocks": args.kv_blocks, "profile": args.profile,
                       "processes": args.processes}, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not any(r[2].errors for r in results.values()) else 1


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
                                   kv_blocks=getattr(args, "kv_blocks", None),
                                   scheduler_config=getattr(args, "scheduler_config",
                                                            None)) as st:
                print(f"astraea replay: in-process stack at {st.address} ({args.policy}, "
                      f"{args.workers} workers, time scale {args.time_scale:g})", file=sys.stderr)
                res = await replay(jobs, st.address, profile, args.time_scale, args.concurrency)
                return res, st.decision_counts
        credentials = {"api_key": getattr(args, "api_key", None),
                       "tls_ca": getattr(args, "tls_ca", None),
                       "tls_cert": getattr(args, "tls_cert", None),
                       "tls_key": getattr(args, "tls_key", None)}
        return await replay(jobs, args.control_plane, profile, args.time_scale,
                            args.concurrency, credentials=credentials), None

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


def _replay_http(args: argparse.Namespace, jobs, profile):
    """Replay `jobs` through the gateway at `--http`, or through a stack of processes with
    a gateway (`--stack --http`): the ReplayResult and no decision counts."""
    import asyncio

    from astraea.tools.replay_http import HttpTarget, replay_http

    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    tokenizer = args.tokenizer
    if tokenizer is None:
        from worker.vllm.tiny_model import resolve_tokenizer

        tokenizer = resolve_tokenizer(None)
    if args.http:
        if args.stack:
            raise ValueError("--http URL drives a running gateway; give --stack --http (no "
                             "URL) to start one")
        target = HttpTarget(args.http, args.model, args.api_key or "none")
        return asyncio.run(replay_http(jobs, target, tokenizer, profile, args.time_scale,
                                       args.concurrency)), None
    if not args.stack:
        raise ValueError("--http needs a URL (or --stack to start a stack with a gateway)")
    from astraea.tools.stack import Stack, StackConfig

    cfg = StackConfig(policy=args.policy, profile=args.profile, time_scale=args.time_scale,
                      workers=args.workers, control_plane_listen="127.0.0.1:0",
                      predictor_listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                      tokenizer=tokenizer)
    with Stack(cfg) as st:
        target = HttpTarget(f"{st.http_address}/v1", cfg.served_model)
        print(f"astraea replay: stack with gateway at {st.http_address} ({args.policy}, "
              f"{args.workers} workers)", file=sys.stderr)
        return asyncio.run(replay_http(jobs, target, tokenizer, profile, args.time_scale,
                                       args.concurrency)), None


def _live_in_processes(args: argparse.Namespace, policy: str, jobs, profile):
    """Replay `jobs` on a `Stack` of separate processes (as `astraea up` starts them)."""
    import asyncio

    from astraea.tools.replay import replay, scrape_kv_decisions
    from astraea.tools.stack import Stack, StackConfig

    cfg = StackConfig(policy=policy, profile=args.profile, time_scale=args.time_scale,
                      workers=args.workers, kv_blocks=args.kv_blocks,
                      settings=list(args.settings),
                      control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                      control_plane_metrics="127.0.0.1:0")
    with Stack(cfg) as st:
        result = asyncio.run(replay(jobs, st.control_plane_address, profile, args.time_scale,
                                    args.concurrency))
        return result, scrape_kv_decisions(st.control_plane_metrics_url)
