"""`astraea trace gen` and `trace stats`: write a generated agent trace, and summarize one."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from astraea.profile import load_profile


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trace", help="agent traces")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    g = tsub.add_parser("gen", help="write a generated agent trace (native JSONL)")
    g.add_argument("--shape", choices=("infercept", "long-context", "heavy-tail", "chat"),
                   default="infercept",
                   help="'infercept': the InferCept agent mix; 'long-context': coding-agent "
                        "sessions (15-120k-token prompts, dozens of 0.02-5 s tool calls; use a "
                        "long-window profile such as llama3-8b-h100); 'heavy-tail': five tool "
                        "categories, log-normal durations (σ 1.5) with means 0.05-50 s; "
                        "'chat': conversations whose user replies take minutes")
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


def cmd_trace_gen(args: argparse.Namespace) -> int:
    from astraea.workloads import GENERATED, write_native

    window = load_profile(args.profile).context_window
    jobs = GENERATED[args.shape](args.jobs, args.seed, qps=args.qps, context_window=window)
    n = write_native(jobs, args.out)
    print(f"wrote {n} jobs to {args.out}", file=sys.stderr)
    return 0


def cmd_trace_stats(args: argparse.Namespace) -> int:
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
