"""`astraea bench`, `report` and `bench-overhead`: the simulator's policy comparison, its saved
tables, and the scheduling core's own cost."""

from __future__ import annotations

import argparse
import json
import sys
import time

from astraea.profile import BUILTIN_PROFILES

DEFAULT_POLICIES = "vllm-fcfs,infercept,autellix-plas,continuum,astraea"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="compare scheduling policies in the simulator")
    b.add_argument("--workload", default="infercept",
                   help="'infercept' (the generated InferCept mix), 'long-context' (generated "
                        "coding-agent sessions), 'heavy-tail' (log-normal tool latencies over "
                        "1000x), 'chat' (minutes-long human replies), 'tiny-agent' (bench-vllm's "
                        "jobs, sized for the small models) or a trace file (native JSONL or "
                        "InferCept JSON)")
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
    b.add_argument("--prediction-error", type=_floats, default=(0.0,), metavar="SIGMA[,SIGMA...]",
                   help="multiply every output-length and API-time estimate a policy receives "
                        "by exp(N(0, SIGMA^2)), drawn per (job, segment) and per (job, API "
                        "call); a list runs each (default 0: estimates as predicted)")
    b.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                   help="GPU KV blocks per worker (default: the profile's); a pool too big to "
                        "fill shows what batching and queueing cost with memory never binding")
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


def cmd_bench(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import (
        aggregate,
        format_degradation,
        format_tables,
        goal_check,
        plot,
        replica_check,
        write_json,
    )
    from astraea.tools.bench.run import BenchSpec, run_matrix
    from control_plane.core.config import parse_settings

    qps: tuple = args.qps
    spec = BenchSpec(
        workload=args.workload, profile=args.profile,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        qps=qps, jobs=args.jobs, seeds=args.seeds, predictor=args.predictor,
        num_workers=args.workers, overrides=parse_settings(args.set or []),
        prediction_error=args.prediction_error, kv_blocks=args.kv_blocks,
    )
    from astraea.workloads import GENERATED

    if args.workload not in GENERATED:
        from astraea.workloads import load_trace

        trace = load_trace(args.workload)
        if all(j.arrival_s is not None for j in trace):
            print(f"{args.workload} has its own arrival times: --qps is ignored", file=sys.stderr)
            spec = BenchSpec(**{**spec.__dict__, "qps": (None,)})
    started = time.perf_counter()
    sigmas, error = "", ""
    if spec.prediction_error != (0.0,):  # the header of a plain run stays as it was
        sigmas = f"{len(spec.prediction_error)} sigma x "
        error = ", prediction error sigma " + ",".join(f"{e:g}" for e in spec.prediction_error)
    print(f"astraea bench: {len(spec.policies)} policies x {len(spec.qps)} QPS x {sigmas}"
          f"{len(spec.seeds)} seeds, {spec.jobs} jobs each, profile {spec.profile}, "
          f"predictor {spec.predictor}{error}"
          + (f", {spec.kv_blocks} KV blocks per worker" if spec.kv_blocks else ""),
          file=sys.stderr)
    runs = run_matrix(spec, parallel=args.parallel)
    rows = aggregate(runs)
    print(format_tables(rows))
    degradation = format_degradation(rows)
    if degradation:
        print(degradation)
    check = replica_check(rows)
    if check:
        print("\nastraea against vllm-fcfs and the peers (the paper-replica criteria):")
        print("\n".join("  " + line for line in check))
    goal = goal_check(rows)
    if goal:
        print("\nastraea against the best peer, per load (the tail goal):")
        print("\n".join("  " + line for line in goal))
    print(f"\n{len(runs)} simulations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        write_json(args.out, spec.to_dict(), rows, runs)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(args.plot, rows)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from astraea.tools.bench.report import (
        format_degradation,
        format_tables,
        goal_check,
        markdown_summary,
        replica_check,
    )

    try:
        with open(args.results) as f:
            data = json.load(f)
        rows = data["rows"]
    except FileNotFoundError:
        raise ValueError(f"{args.results}: no such results file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{args.results}: not a results file written by 'astraea bench --out'") from None
    print(markdown_summary(rows) if args.markdown else format_tables(rows))
    degradation = format_degradation(rows)
    if degradation and not args.markdown:
        print(degradation)
    print("\n".join(replica_check(rows)))
    if not args.markdown:
        print("\n".join(goal_check(rows)))
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
