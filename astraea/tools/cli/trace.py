"""`astraea trace gen`, `trace convert` and `trace stats`: write a generated agent trace,
turn an agent's own logs into one, and summarize one."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from astraea.profile import load_profile


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trace", help="agent traces")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    g = tsub.add_parser("gen", help="write a generated agent trace (native JSONL)")
    g.add_argument("--shape", choices=("infercept", "long-context", "heavy-tail", "chat", "tiny-agent"),
                   default="infercept",
                   help="'infercept': the InferCept agent mix; 'long-context': coding-agent "
                        "sessions (15-120k-token prompts, dozens of 0.02-5 s tool calls; use a "
                        "long-window profile such as llama3-8b-h100); 'heavy-tail': five tool "
                        "categories, log-normal durations (σ 1.5) with means 0.05-50 s; "
                        "'chat': conversations whose user replies take minutes; 'tiny-agent': "
                        "bench-vllm's jobs, sized for the project's small models")
    g.add_argument("--jobs", type=int, default=1000)
    g.add_argument("--qps", type=float, default=None,
                   help="Poisson arrival rate; omit for a trace without arrivals")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--profile", default="gptj-6b-a100", help="sets the context window")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_trace_gen)

    c = tsub.add_parser("convert", help="turn agent logs into a native JSONL trace",
                        description="Read Claude Code session logs, TraceLab round traces, an "
                                    "InferCept JSON trace or a live run's span directory and "
                                    "write native JSONL (one job per session); a summary goes "
                                    "to stderr.")
    c.add_argument("--from", dest="fmt", required=True,
                   choices=("claude-code", "tracelab", "infercept", "spans"),
                   help="'claude-code': ~/.claude/projects/<project>/<session>.jsonl files or "
                        "folders of them; 'tracelab': TraceLab round JSONL (.gz too); "
                        "'infercept': InferCept's JSON; 'spans': ASTRAEA_TELEMETRY_SPAN_DIR "
                        "directories (control plane and worker files)")
    c.add_argument("inputs", nargs="+", metavar="INPUT")
    c.add_argument("-o", "--out", required=True, help="the native JSONL to write")
    c.add_argument("--tokenizer-ratio", type=float, default=4.0, metavar="CHARS_PER_TOKEN",
                   help="characters per token where a log has text but no token counts")
    c.add_argument("--max-wait-s", type=float, default=None,
                   help="cap each tool or human wait at this many seconds (a user who came "
                        "back the next day)")
    c.add_argument("--time-scale", type=float, default=1.0,
                   help="spans: the run's time scale (wall seconds per trace second)")
    c.set_defaults(func=cmd_trace_convert)

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


def cmd_trace_convert(args: argparse.Namespace) -> int:
    from astraea.workloads import write_native
    from astraea.workloads.converters import Options, convert, summary

    notes: list[str] = []
    opts = Options(chars_per_token=args.tokenizer_ratio, max_wait_s=args.max_wait_s,
                   time_scale=args.time_scale)
    jobs = convert(args.fmt, args.inputs, opts, notes)
    n = write_native(jobs, args.out)
    print(summary(args.fmt, jobs, notes), file=sys.stderr)
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
