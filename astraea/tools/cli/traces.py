"""`astraea traces`: list the jobs in a span directory, or print one job's trace as a tree."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("traces", help="show a job's trace from the span files the services "
                                       "write (ASTRAEA_TELEMETRY_SPAN_DIR, the demo's traces/)")
    tr.add_argument("dir", help="the span directory")
    tr.add_argument("--job", default=None, help="the job whose trace to print as a tree")
    tr.add_argument("--limit", type=int, default=20, help="job ids listed without --job")
    tr.set_defaults(func=cmd_traces)


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
