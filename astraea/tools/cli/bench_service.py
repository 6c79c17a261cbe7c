"""`astraea bench-service`: load the live control plane with many jobs on simulated workers and
report its throughput and plan latency."""

from __future__ import annotations

import argparse
import json
import sys


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The stack and job shape `bench-service` and `bench-soak` share."""
    p.add_argument("--workers", type=int, default=2, help="simulated worker processes")
    p.add_argument("--policy", default="astraea")
    p.add_argument("--profile", default="gptj-6b-a100",
                   help="base hardware profile (its step limits are raised for the benchmark)")
    p.add_argument("--time-scale", type=float, default=0.1,
                   help="wall seconds per engine second (control plane and workers)")
    p.add_argument("--tokens", type=int, default=4, help="output tokens per segment")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt tokens per segment")
    p.add_argument("--segments-per-job", type=int, default=8,
                   help="segments per job (a tool call between two); then a new job")
    p.add_argument("--tool-ms", type=float, default=2.0, help="wall ms of each tool call")
    p.add_argument("--kv-blocks", type=int, default=200_000,
                   help="GPU KV blocks per worker (large: memory must not bind)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    bs = sub.add_parser("bench-service", help="load the live control plane (separate process) "
                                              "with N jobs in flight on simulated workers: "
                                              "segments/s, events/s, plan latency")
    bs.add_argument("--jobs", type=int, default=1000, help="jobs in flight")
    bs.add_argument("--seconds", type=float, default=20.0, help="measured window")
    bs.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    add_load_arguments(bs)
    bs.add_argument("--no-tool-reports", action="store_true",
                    help="diagnostic: skip ReportToolCall around each tool call (the API "
                         "allows it), to see what those two calls per segment cost")
    bs.add_argument("--log-level", default="info",
                    help="the control plane's log level (default info, as it ships)")
    bs.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    bs.add_argument("--cprofile", default=None, metavar="FILE",
                    help="write a cProfile of the control plane's event loop over the window")
    bs.add_argument("--grpc-floor", action="store_true",
                    help="reference: the same load against an AgentService whose handlers do "
                         "nothing (no scheduler, no workers): the gRPC cost floor")
    bs.add_argument("--state-dir", default=None, metavar="DIR",
                    help="the control plane keeps durable state in DIR (SQLite), to measure "
                         "what durability costs (default: in memory)")
    bs.add_argument("--database", default=None, metavar="URL",
                    help="the same with a PostgreSQL database (postgresql://user@host/db)")
    # astraea.store.STORE_WRITERS, written out: the parser must not import the store
    bs.add_argument("--store-writer", choices=("thread", "process"), default="process",
                    help="where the control plane runs SQLite's statements (its "
                         "--store-writer): a child process (default) or a thread")
    bs.add_argument("--out", help="write the report as JSON")
    bs.set_defaults(func=cmd_bench_service)


def cmd_bench_service(args: argparse.Namespace) -> int:
    from astraea.tools.bench.service_load import ServiceBenchConfig, format_report, run

    cfg = ServiceBenchConfig(
        jobs=args.jobs, seconds=args.seconds, warmup=args.warmup, workers=args.workers,
        policy=args.policy, profile=args.profile, time_scale=args.time_scale,
        tokens=args.tokens, prompt_tokens=args.prompt_tokens,
        segments_per_job=args.segments_per_job, tool_ms=args.tool_ms,
        tool_reports=not args.no_tool_reports,
        kv_blocks=args.kv_blocks, log_level=args.log_level, log_dir=args.log_dir,
        cprofile=args.cprofile, grpc_floor=args.grpc_floor, state_dir=args.state_dir,
        database=args.database, store_writer=args.store_writer)
    report = run(cfg)
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not report["errors"] and not report["bad_token_segments"] else 1
