"""`astraea up` and `demo`: the stack's services as separate processes on loopback, kept up
until Ctrl-C, or run once under vllm-fcfs and astraea on the same jobs."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from astraea.profile import BUILTIN_PROFILES, load_profile

# `astraea demo`: a burst of 200 jobs on one simulated A100 whose KV cache is cut to 3,000
# blocks (48k tokens), so memory binds as on a busy GPU and the schedulers differ (in the
# simulator: astraea 0.64x vllm-fcfs's mean JCT). About 440 virtual s per policy: 88 s of wall
# time at 5x real time, the fastest at which the live gap stays close to the simulator's
# (0.70 live here; at 10x the hosts' message latency, multiplied up, blurs it to 0.8-0.9).
DEMO_JOBS, DEMO_QPS, DEMO_TIME_SCALE, DEMO_KV_BLOCKS = 200, 30.0, 0.2, 3000
DEMO_POLICIES = ("vllm-fcfs", "astraea")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the predictor, the control plane and N workers as "
                                   "separate processes on loopback; Ctrl-C stops them")
    up.add_argument("--config", help="a TOML file of StackConfig fields; flags override it")
    _stack_args(up, time_scale_default=None, workers_default=None)
    up.add_argument("--listen", dest="control_plane_listen", default=None,
                    help="the control plane's host:port (default: 127.0.0.1:50051)")
    up.add_argument("--predictor-listen", default=None,
                    help="the predictor's host:port (default: 127.0.0.1:50071)")
    up.add_argument("--http", dest="http_listen", default=None, metavar="HOST:PORT",
                    help="also start the OpenAI gateway (Chat Completions) on HOST:PORT")
    up.add_argument("--api-key", dest="api_keys", action="append", default=None,
                    metavar="KEY", help="a key the gateway requires (repeatable); without "
                                        "one it serves loopback only")
    up.add_argument("--predictor-state", default=None, metavar="FILE",
                    help="the predictor's state file: loaded at (re)start, saved periodically "
                         "and on shutdown")
    up.add_argument("--state-dir", type=lambda d: str(Path(d).resolve()), default=None,
                    metavar="DIR", help="the control plane's durable state: accepted jobs "
                                        "survive its restarts (default: state/ in the log dir)")
    up.add_argument("--no-state", dest="state_dir", action="store_const", const="",
                    help="keep the control plane's state in memory: a restart loses every job "
                         "(and the gateway's: stored Responses and named sessions; else in "
                         "gateway-state/ in the log dir)")
    up.add_argument("--set", dest="settings", action="append", default=None,
                    metavar="SECTION.FIELD=VALUE",
                    help="a scheduling setting for the control plane, e.g. --set "
                         "mlfq.num_levels=3 (repeatable; see control_plane/core/config.py)")
    up.add_argument("--max-restarts", dest="restart_max", type=int, default=None, metavar="N",
                    help="a service that exits is restarted (backoff 0.5 s doubling to 10 s); "
                         "more than N restarts of one within --restart-window stop the stack "
                         "(default 5; 0: any exit stops it)")
    up.add_argument("--restart-window", dest="restart_window_s", type=float, default=None,
                    metavar="SECONDS", help="the window of --max-restarts (default 60)")
    up.add_argument("--insecure", dest="secure", action="store_false", default=None,
                    help="plaintext and no keys on every service (default: TLS with a "
                         "development CA, and keys, written to the log dir's security/)")
    up.set_defaults(func=cmd_up)

    dm = sub.add_parser("demo", help="bring the stack up under vllm-fcfs and under astraea, "
                                     "replay the same InferCept-mix jobs, print both JCT tables")
    dm.add_argument("--jobs", type=int, default=DEMO_JOBS)
    dm.add_argument("--qps", type=float, default=DEMO_QPS, help="Poisson arrival rate")
    dm.add_argument("--seed", type=int, default=0)
    _stack_args(dm, time_scale_default=DEMO_TIME_SCALE, workers_default=1, policy=False)
    dm.set_defaults(func=cmd_demo, config=None, policy=None, control_plane_listen=None,
                    predictor_listen=None, kv_blocks=DEMO_KV_BLOCKS)


def _stack_args(p: argparse.ArgumentParser, time_scale_default, workers_default,
                policy: bool = True) -> None:
    if policy:
        p.add_argument("--policy", default=None, help="scheduling policy (default: astraea)")
    p.add_argument("--profile", default=None,
                   help=f"built-in ({', '.join(BUILTIN_PROFILES)}) or a profile JSON path "
                        "(default: gptj-6b-a100)")
    p.add_argument("--time-scale", type=float, default=time_scale_default,
                   help="wall seconds per virtual second, for the control plane and workers")
    p.add_argument("--workers", type=int, default=workers_default, help="simulated workers")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="GPU KV blocks per worker (default: the profile's)")
    p.add_argument("--log-dir", default=None,
                   help="directory for the services' logs (default: a new temporary one)")
    p.add_argument("--log-level", default=None,
                   help="the services' log level (default: $ASTRAEA_LOG_LEVEL or info)")
    p.add_argument("--no-predictor", action="store_true",
                   help="no predictor service: the control plane uses local estimates")


def up_config(args: argparse.Namespace):
    """The `StackConfig` of `astraea up`: secure, and durable unless --no-state (the gateway's
    state next to the control plane's, in the log dir)."""
    return _stack_config(args, defaults={"secure": True, "state_dir": "state",
                                         "gateway_state_dir": "gateway-state"})


def cmd_up(args: argparse.Namespace) -> int:
    from astraea.tools.stack import Stack, StackError

    # Secure unless --insecure (or `secure = false` in the config file).
    cfg = up_config(args)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        # From another thread: the main thread may hold the event's (non-reentrant) lock
        # inside stop.wait() when the handler runs there.
        threading.Thread(target=stop.set, daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"astraea up: starting {'a predictor, ' if cfg.predictor else ''}a control plane "
              f"and {cfg.workers} workers", file=sys.stderr, flush=True)
        st = Stack(cfg)
        st.start()
        try:
            print("astraea up: stack ready", file=sys.stderr)
            _print_stack(st)
            print(f"astraea up: clients connect to {st.control_plane_address}; Ctrl-C or "
                  "SIGTERM stops the stack", file=sys.stderr, flush=True)
            _print_client_security(st)
            code = 0
            while not stop.wait(0.5):
                try:
                    for line in st.supervise():
                        print(f"astraea up: {line}", file=sys.stderr, flush=True)
                except StackError as e:
                    print(f"astraea up: {e}\nastraea up: stopping the stack", file=sys.stderr)
                    code = 1
                    break
        finally:
            print("astraea up: stopping", file=sys.stderr, flush=True)
            codes = st.stop()
        bad = {n: c for n, c in codes.items() if c != 0}
        print("astraea up: stopped" + (f"; non-zero exits: {bad}" if bad else " (all exited 0)"),
              file=sys.stderr)
        return code or (1 if bad else 0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from astraea.telemetry import TelemetryConfig, setup_telemetry
    from astraea.telemetry.span_files import (
        format_tree,
        job_trace,
        kv_decision_counts,
        load_spans,
    )
    from astraea.tools.bench.report import aggregate, format_tables
    from astraea.tools.replay import replay, replay_jobs, run_row
    from astraea.tools.stack import Stack

    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if not args.qps > 0:
        raise ValueError("--qps must be positive")
    started = time.monotonic()
    base_cfg = _stack_config(args)
    profile = load_profile(base_cfg.profile)
    jobs, qps = replay_jobs("infercept", args.jobs, args.qps, args.seed, profile.context_window)
    base = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="astraea-demo-"))
    kv = f"{base_cfg.kv_blocks} KV blocks" if base_cfg.kv_blocks else "the profile's KV cache"
    print(f"astraea demo: {len(jobs)} InferCept-mix jobs at {qps:g} QPS (seed {args.seed}), "
          f"under {' and '.join(DEMO_POLICIES)}; {args.workers} simulated {profile.gpu} "
          f"worker(s) with {kv}, time scale {args.time_scale:g}; logs and traces in {base}",
          file=sys.stderr, flush=True)
    rows, results, stacks = {}, {}, {}
    from astraea.tools import demo_openai

    openai_missing = demo_openai.available()
    agent_turns: list[dict] = []
    for policy in DEMO_POLICIES:
        span_dir = base / policy / "traces"
        # astraea's stack also runs the OpenAI gateway, for the agent after the replay.
        http = "127.0.0.1:0" if policy == "astraea" and openai_missing is None else None
        cfg = _stack_config(args, policy=policy, log_dir=str(base / policy),
                            control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                            span_dir=str(span_dir), http_listen=http)
        # The replaying client's spans (the root of each job's trace) go beside the services'.
        client_tel = setup_telemetry(TelemetryConfig("astraea-replay", span_dir=str(span_dir)),
                                     configure_logs=False)
        t = time.monotonic()
        print(f"[{policy}] starting the stack ...", file=sys.stderr, flush=True)
        try:
            with Stack(cfg) as st:
                print(f"[{policy}] stack up in {time.monotonic() - t:.1f} s: control plane "
                      f"{st.control_plane_address}, predictor {st.predictor_address or 'none'}, "
                      f"{cfg.workers} workers; replaying ...", file=sys.stderr, flush=True)
                res = asyncio.run(replay(jobs, st.control_plane_address, profile,
                                         cfg.time_scale, log=sys.stderr,
                                         tracer=client_tel.tracer))
                print(f"[{policy}] {len(jobs) - len(res.errors)}/{len(jobs)} jobs done in "
                      f"{res.wall_s:.1f} s wall ({res.makespan_s:.1f} virtual s)",
                      file=sys.stderr, flush=True)
                if st.http_address:
                    print(f"[{policy}] an agent on the official openai SDK against "
                          f"{st.http_address}/v1 (no session key sent):", file=sys.stderr,
                          flush=True)
                    agent_turns = demo_openai.run_agent(f"{st.http_address}/v1",
                                                        cfg.served_model)
                print(f"[{policy}] stopping ...", file=sys.stderr, flush=True)
        finally:
            client_tel.shutdown()
        codes = st.exit_codes
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            print(f"[{policy}] non-zero exits: {bad}", file=sys.stderr)
        for job_id, err in list(res.errors.items())[:5]:
            print(f"[{policy}] job {job_id} failed: {err}", file=sys.stderr)
        # The services run apart, so the KV decisions are counted from their traces.
        counts = kv_decision_counts(load_spans(str(span_dir)))
        rows[policy] = run_row(res, policy, qps, args.seed, len(jobs), counts)
        results[policy], stacks[policy] = res, st

    print("\n== live stacks (separate processes on loopback), the same jobs under each policy")
    print(format_tables(aggregate([rows[p] for p in DEMO_POLICIES])).lstrip("\n"))
    fcfs = rows["vllm-fcfs"].get("mean_jct_s", float("nan"))
    ours = rows["astraea"].get("mean_jct_s", float("nan"))
    ratio = ours / fcfs if fcfs > 0 else float("nan")
    print(f"\nmean JCT, live: astraea {ours:.1f} s, vllm-fcfs {fcfs:.1f} s; astraea / vllm-fcfs "
          f"= {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    sim = _demo_simulated(jobs, profile, base_cfg.kv_blocks, args.workers)
    print(f"mean JCT, simulator on the same jobs: astraea {sim['astraea']:.1f} s, vllm-fcfs "
          f"{sim['vllm-fcfs']:.1f} s; astraea / vllm-fcfs = "
          f"{sim['astraea'] / sim['vllm-fcfs']:.3f}")

    print("\n== the OpenAI API: an agent using the official openai SDK, unchanged, on the "
          "astraea stack")
    if agent_turns:
        for t in agent_turns:
            print(f"  turn {t['turn']}: prompt {t['prompt_tokens']} tokens, cached "
                  f"{t['cached_tokens']} (kept through the tool call, not recomputed), "
                  f"generated {t['completion_tokens']}; job {t['job']}")
        jobs_seen = {t["job"] for t in agent_turns}
        print(f"  {len(agent_turns)} requests, {len(jobs_seen)} job: the session was found by "
              "its prompt prefix")
    else:
        print(f"  skipped: {openai_missing}")
    print("\nWhere each job can be seen:")
    example = next(iter(j.job_id for j in jobs if len(j.segments) > 1), jobs[0].job_id)
    for policy in DEMO_POLICIES:
        span_dir = base / policy / "traces"
        print(f"  {policy}: traces in {span_dir} (one trace per job: the client's agent span, "
              f"the control plane's job/segment/api_wait spans, the worker's admissions); "
              f"`astraea traces {span_dir} --job ID` prints one; logs (JSON lines with "
              f"job_id and trace_id) in {stacks[policy].log_dir}")
    try:
        tree = format_tree(job_trace(load_spans(str(base / "astraea" / "traces")), example))
        print(f"\nThe trace of job {example} under astraea (start offset, duration, service):")
        print(tree)
    except ValueError as e:
        print(f"  (no trace of {example} to show: {e})")
    print("  With OTEL_EXPORTER_OTLP_ENDPOINT set, the same spans go to your collector (Jaeger, "
          "Tempo ...) as well.")
    failed = sum(len(r.errors) for r in results.values())
    print(f"\nastraea demo: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if not failed else 1


def _stack_config(args: argparse.Namespace, defaults: dict | None = None, **fixed):
    """The `StackConfig` of `astraea up`/`demo`: `defaults`, overridden by `--config FILE` (if
    any), then by the flags given and then by `fixed`."""
    from astraea.tools.stack import StackConfig

    flags = {"policy": args.policy, "profile": args.profile, "time_scale": args.time_scale,
             "workers": args.workers, "kv_blocks": args.kv_blocks,
             "control_plane_listen": args.control_plane_listen,
             "predictor_listen": args.predictor_listen, "log_dir": args.log_dir,
             "log_level": args.log_level}
    if getattr(args, "no_predictor", False):
        flags["predictor"] = False
    for name in ("http_listen", "api_keys", "predictor_state", "restart_max",
                 "restart_window_s", "secure", "state_dir", "settings"):
        if getattr(args, name, None) is not None:
            flags[name] = getattr(args, name)
    if flags.get("state_dir") == "":  # --no-state: the gateway's in memory too
        flags["gateway_state_dir"] = ""
    flags.update(fixed)
    if getattr(args, "config", None):
        return StackConfig.from_toml(args.config, defaults=defaults, **flags)
    return StackConfig.from_dict({}, defaults=defaults, **flags)


def _print_stack(st, out=None) -> None:
    out = out if out is not None else sys.stderr
    cfg = st.config
    print(f"  control plane  {st.control_plane_address}  (policy {cfg.policy}, profile "
          f"{cfg.profile}, time scale {cfg.time_scale:g})", file=out)
    if st.predictor_address:
        print(f"  predictor      {st.predictor_address}", file=out)
    print(f"  workers        {cfg.workers}", file=out)
    if st.http_address:
        print(f"  OpenAI API     {st.http_address}/v1  (model {cfg.served_model!r}"
              f"{', API key required' if cfg.api_keys else ', no API key'})", file=out)
    print(f"  logs in {st.log_dir}:", file=out)
    for name, path in st.log_files.items():
        print(f"    {name:<14} {path}  (pid {st.pids[name]})", file=out)


def _print_client_security(st, out=None) -> None:
    """How a client connects to a secure stack: the CA to verify it with and the key to send."""
    out = out if out is not None else sys.stderr
    sec = st.security
    if sec is None:
        print("astraea up: plaintext, no keys (--insecure): anyone who reaches these ports can "
              "use them", file=out, flush=True)
        return
    print(f"astraea up: TLS (CA {sec.certs.ca}); client key {sec.client_key} (also in "
          f"{sec.client_key_file}), sent as 'authorization: Bearer KEY'. In Python:\n"
          f"  AgentClient(\"{st.control_plane_address}\", tls_ca=\"{sec.certs.ca}\", "
          f"api_key=\"{sec.client_key}\")", file=out, flush=True)


def _demo_simulated(jobs, profile, kv_blocks: int | None, workers: int) -> dict[str, float]:
    """The simulator's mean JCT for the demo's jobs under each demo policy (its prediction)."""
    from astraea.tools.sim.simulator import Simulation

    return {p: Simulation(jobs, profile, p, num_workers=workers, kv_blocks=kv_blocks)
            .run().summary["mean_jct_s"] for p in DEMO_POLICIES}
