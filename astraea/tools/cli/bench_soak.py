"""`astraea bench-soak`: thousands of concurrent jobs on simulated workers for minutes; events/s,
plan latency, control-plane memory, every job completed, and the gRPC floor of the same run."""

from __future__ import annotations

import argparse
import json
import sys

from astraea.tools.cli.bench_service import add_load_arguments


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-soak", help="soak the live control plane with N concurrent jobs "
                                          "for minutes: events/s, plan latency, RSS, every "
                                          "job completed, ratio to the gRPC floor")
    p.add_argument("--jobs", type=int, default=5000, help="jobs in flight")
    p.add_argument("--minutes", type=float, default=10.0, help="measured window")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the window")
    p.add_argument("--interval", type=float, default=30.0,
                   help="seconds between reads of the control plane's counters")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds the jobs in flight get to finish after the window")
    add_load_arguments(p)
    p.add_argument("--log-level", default="info", help="the control plane's log level")
    p.add_argument("--floor-seconds", type=float, default=30.0,
                   help="window of the gRPC-floor measurement after the soak (0: none)")
    p.add_argument("--floor-warmup", type=float, default=10.0)
    p.add_argument("--floor-jobs", type=int, default=0,
                   help="jobs in flight against the floor (0: as the soak, at most 1,000)")
    p.add_argument("--cprofile", default=None, metavar="FILE",
                   help="write a cProfile of the control plane's event loop from the window's "
                        "start (rewritten at each interval, last after the drain)")
    p.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    p.add_argument("--json", dest="out", metavar="FILE", help="write the report as JSON")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_soak)


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from astraea.tools.bench.soak import SoakConfig, format_report, run

    cfg = SoakConfig(
        jobs=args.jobs, minutes=args.minutes, warmup=args.warmup, interval=args.interval,
        drain_timeout=args.drain_timeout, workers=args.workers, policy=args.policy,
        profile=args.profile, time_scale=args.time_scale, tokens=args.tokens,
        prompt_tokens=args.prompt_tokens, segments_per_job=args.segments_per_job,
        tool_ms=args.tool_ms, kv_blocks=args.kv_blocks, log_level=args.log_level,
        floor_seconds=args.floor_seconds, floor_warmup=args.floor_warmup,
        floor_jobs=args.floor_jobs, log_dir=args.log_dir,
        cprofile=args.cprofile)
    report = run(cfg)
    if args.out:  # first: a long run's figures survive whatever happens next
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    print(format_report(report))
    return 0 if report["all_jobs_completed"] else 1
