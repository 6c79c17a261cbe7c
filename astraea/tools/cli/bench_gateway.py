"""`astraea bench-gateway`: the OpenAI gateway beside the gRPC path on simulated workers —
mean JCT of the same trace over both, and what the gateway adds per request."""

from __future__ import annotations

import argparse
import json
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    bg = sub.add_parser("bench-gateway", help="the same trace over the OpenAI API and over "
                                              "gRPC (mean JCT), and the gateway's added "
                                              "latency and requests/s per request")
    bg.add_argument("--trace", default="infercept",
                    help="a trace file, or 'infercept' for the generated mix")
    bg.add_argument("--jobs", type=int, default=200)
    bg.add_argument("--qps", type=float, default=2.0)
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--time-scale", type=float, default=0.05,
                    help="the JCT runs' time scale (wall seconds per virtual second)")
    bg.add_argument("--workers", type=int, default=2)
    bg.add_argument("--policy", default="astraea")
    bg.add_argument("--profile", default="gptj-6b-a100")
    bg.add_argument("--requests", type=int, default=600,
                    help="requests per path in the per-request measurement")
    bg.add_argument("--concurrency", type=int, default=8,
                    help="closed-loop clients in the per-request measurement")
    bg.add_argument("--skip-jct", action="store_true", help="only the per-request measurement")
    bg.add_argument("--out", help="write the report as JSON")
    bg.set_defaults(func=cmd_bench_gateway)


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    from astraea.tools.bench.gateway import GatewayBenchConfig, format_report, run

    for name in ("jobs", "requests", "concurrency", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    cfg = GatewayBenchConfig(trace=args.trace, jobs=args.jobs, qps=args.qps, seed=args.seed,
                             time_scale=args.time_scale, workers=args.workers,
                             policy=args.policy, profile=args.profile, requests=args.requests,
                             concurrency=args.concurrency, skip_jct=args.skip_jct)
    report = run(cfg)
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    jct_errors = sum(r.get("errors", 0) for r in report.get("jct", {}).values())
    req_errors = sum(r["errors"] for r in report["per_request"].values())
    return 0 if not jct_errors and not req_errors else 1
