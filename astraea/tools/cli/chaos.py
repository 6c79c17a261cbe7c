"""`astraea chaos`: replay a trace on a stack of processes while SIGKILLing a worker, the
predictor, the gateway and the control plane in turn; compare every job's tokens with a clean
run (astraea.tools.chaos)."""

from __future__ import annotations

import argparse
import sys

from astraea.profile import BUILTIN_PROFILES, load_profile

KILLS = ("worker", "predictor", "gateway", "control-plane")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="replay a trace while killing each service in turn "
                                     "(SIGKILL, supervised restart); check every job's tokens "
                                     "against a clean run")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="a trace file (native JSONL or InferCept JSON); default: the generated "
                        "InferCept mix of --jobs jobs")
    p.add_argument("--jobs", type=int, default=None,
                   help="jobs to replay (default: 200 of the mix, or the whole trace)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated jobs and arrivals")
    p.add_argument("--qps", type=float, default=0.5,
                   help="Poisson arrival rate for the mix and traces without arrival times")
    p.add_argument("--time-scale", type=float, default=0.2,
                   help="wall seconds per virtual second, for the stack and the tools")
    p.add_argument("--clean-time-scale", type=float, default=None,
                   help="the clean run's time scale (default: --time-scale; the simulated "
                        "tokens do not depend on it)")
    p.add_argument("--kills", default=",".join(KILLS), metavar="LIST",
                   help=f"the services to kill, in this order (default: {','.join(KILLS)})")
    p.add_argument("--interval", type=float, default=3.0, metavar="S",
                   help="wall seconds from the replay's start to the first kill, and from each "
                        "recovery to the next kill")
    p.add_argument("--http-every", type=int, default=4, metavar="N",
                   help="every N-th job goes through the gateway with the openai SDK (0: none)")
    p.add_argument("--parallel", action="store_true",
                   help="run the clean replay beside the chaos one (two stacks at once): less "
                        "wall time, slower recoveries")
    p.add_argument("--no-gateway-state", dest="gateway_state", action="store_false",
                   help="the gateway keeps its sessions in memory only (default: in a state "
                        "directory, so they survive its restart)")
    p.add_argument("--workers", type=int, default=2, help="simulated workers")
    p.add_argument("--policy", default="astraea", help="scheduling policy")
    p.add_argument("--profile", default="gptj-6b-a100",
                   help=f"built-in ({', '.join(BUILTIN_PROFILES)}) or a profile JSON path")
    p.add_argument("--log-dir", default=None,
                   help="the two stacks' logs go to DIR/clean and DIR/chaos (default: a new "
                        "temporary directory)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    p.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    from astraea.tools.chaos import ChaosOptions, run_chaos
    from astraea.tools.chaos_report import write_json
    from astraea.tools.replay import replay_jobs

    profile = load_profile(args.profile)
    if args.trace is None:
        jobs, _ = replay_jobs("infercept", args.jobs or 200, args.qps, args.seed,
                              profile.context_window)
    else:
        jobs, _ = replay_jobs(args.trace, args.jobs, args.qps, args.seed, profile.context_window)
    kills = tuple(k.strip() for k in args.kills.split(",") if k.strip())
    opts = ChaosOptions(jobs, time_scale=args.time_scale, kills=kills,
                        interval_s=args.interval, http_every=args.http_every,
                        workers=args.workers, policy=args.policy, profile=args.profile,
                        log_dir=args.log_dir, clean_time_scale=args.clean_time_scale,
                        parallel=args.parallel, gateway_state=args.gateway_state)
    what = args.trace or f"InferCept mix (seed {args.seed}, {args.qps:g} QPS)"
    print(f"astraea chaos: {len(jobs)} jobs of {what}, time scale {args.time_scale:g}; kills: "
          f"{', '.join(kills) or 'none'}", file=sys.stderr, flush=True)
    report = run_chaos(opts)
    print(report.format())
    if args.json:
        write_json(report, args.json)
    return 0 if report.ok else 1
