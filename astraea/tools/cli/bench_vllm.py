"""`astraea bench-vllm`: a small agent trace on the live stack with one vLLM worker under each
policy."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


def add_parsers(sub: argparse._SubParsersAction) -> None:
    # --policies and --profile default to VllmBenchConfig's values (None here): importing the
    # benchmark to read them would load the workloads and numpy for every `astraea` command.
    bv = sub.add_parser("bench-vllm", help="replay a small agent trace on the live stack with "
                                           "one vLLM worker (tiny model) under each policy: "
                                           "mean JCT and the astraea / vllm-fcfs ratio")
    bv.add_argument("--jobs", type=int, default=36)
    bv.add_argument("--qps", type=float, default=4.0, help="Poisson arrival rate")
    bv.add_argument("--seed", type=int, default=0)
    bv.add_argument("--policies", default=None)
    bv.add_argument("--kv-blocks", type=int, default=48,
                    help="usable KV blocks (32 tokens each) of the vLLM worker: small, so "
                         "memory binds")
    bv.add_argument("--model", default="small",
                    help="a local Hugging Face model folder, or a model the project builds: "
                         "small (default: recompute costs about a short tool call on 2 CPU "
                         "cores) or tiny (recompute nearly free)")
    bv.add_argument("--profile", default=None,
                    help="the control plane's cost model: a profile name or file, or "
                         "'measure' (time the engine on this machine first, ~40 s)")
    bv.add_argument("--dtype", default="float32",
                    help="the worker's dtype, and the measured profile's (default float32: "
                         "vLLM's auto runs bfloat16 on CPU, emulated on CPUs without AVX-512 "
                         "BF16)")
    bv.add_argument("--set", dest="settings", action="append", default=[],
                    metavar="SECTION.FIELD=VALUE",
                    help="a scheduling setting for every policy's control plane (repeatable), "
                         "e.g. --set mlfq.new_jobs_wait_for_blocked=true")
    bv.add_argument("--log-dir", default=None, help="logs and traces (default: a temp dir)")
    bv.add_argument("--out", help="write the report as JSON")
    bv.set_defaults(func=cmd_bench_vllm)


def cmd_bench_vllm(args: argparse.Namespace) -> int:
    from astraea.tools.bench.vllm_live import VllmBenchConfig, format_report, run

    cfg = VllmBenchConfig(jobs=args.jobs, qps=args.qps, seed=args.seed,
                          kv_blocks=args.kv_blocks, model=args.model, dtype=args.dtype,
                          settings=tuple(args.settings), log_dir=args.log_dir)
    if args.policies is not None:
        cfg = replace(cfg, policies=tuple(p.strip() for p in args.policies.split(",")
                                          if p.strip()))
    if args.profile is not None:
        cfg = replace(cfg, profile=args.profile)
    report = run(cfg)
    print(format_report(report))
    print(f"astraea bench-vllm: done in {report['wall_s']:.0f} s", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not any(r["errors"] for r in report["runs"]) else 1
