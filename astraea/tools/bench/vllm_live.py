"""`astraea bench-vllm`: the same agent trace through the live stack with one real vLLM
worker, under each policy (default: vllm-fcfs, infercept, continuum, autellix-plas, astraea),
and astraea's mean JCT ratio to each.

First, by default, the engine is timed on this machine (`astraea profile` on the same model)
and that profile is the control plane's cost model, so that it prices recompute and swaps
as they are here. Then for each policy a `Stack` of separate processes is started
(predictor, control plane at time scale 1.0, one ``--backend vllm`` worker, by default on the
project's "small" model, with a KV pool of `kv_blocks` usable blocks of 32 tokens, small
enough that the jobs cannot all stay resident), the trace is replayed with
`astraea.tools.replay.replay` at time scale 1.0 (so JCTs are wall seconds), and the stack is
stopped. The KV decisions are counted from the services' span files, and the engine's steps
as the worker timed them (the predictor's saved step samples: the last 2,048) are set against
the cost model's price for the same steps: `step_time_ratio` is their total measured time over
the total the profile predicts (1: the control plane plans with the engine's real speed).

The trace is the tiny-agent workload (astraea/workloads/tiny_agent.py): a scaled-down
InferCept mix for the project's models, seeded, with Poisson arrivals at `qps`; `astraea bench
--workload tiny-agent --kv-blocks 48 --profile P` replays the same jobs in the simulator.
Prompt token ids are drawn from the model's vocabulary (skipping <s> and </s>), seeded per
job and segment, so both policies see the same tokens. The random model may emit </s> before
a segment's budget: that job then ends there (greedy decoding is token-exact under every KV
action, so it ends at the same point under every policy); the report counts such jobs.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from astraea.workloads.tiny_agent import generate_tiny_agent
from astraea.workloads.trace import JobTrace

# Astraea against every peer, vllm-fcfs first (the ratios' baseline).
DEFAULT_POLICIES = ("vllm-fcfs", "infercept", "continuum", "autellix-plas", "astraea")
MEASURE = "measure"  # --profile: time this machine's engine first (astraea profile)
FIRST_ID = 2  # <s> is 0, </s> is 1 in the tiny model's vocabulary


@dataclass
class VllmBenchConfig:
    jobs: int = 36
    qps: float = 4.0
    seed: int = 0
    policies: tuple[str, ...] = DEFAULT_POLICIES
    kv_blocks: int = 48  # usable blocks of 32 tokens: 1,536 tokens for all jobs together
    # A folder, or a model the project builds: "small" (recompute costs about as much as a
    # short tool call on two CPU cores, so the KV policy matters) or "tiny" (nearly free).
    model: str | None = "small"
    # The control plane's cost model: a profile name or file, or MEASURE (the engine timed
    # on this machine before the runs, written to the log folder).
    profile: str = MEASURE
    # The worker's dtype, and the measured profile's. float32: vLLM's "auto" runs a float32
    # checkpoint in bfloat16 on CPU, which CPUs without AVX-512 BF16 emulate several times
    # slower; and a profile measured in one dtype misleads the cost model about another.
    dtype: str = "float32"
    # Scheduling settings for every policy's control plane ("section.field=value").
    settings: tuple[str, ...] = ()
    log_dir: str | None = None
    log_level: str = "info"


@dataclass
class PolicyRun:
    policy: str
    summary: dict
    errors: dict[str, str]
    wall_s: float
    stopped_early: list[str] = field(default_factory=list)  # the model emitted EOS
    kv_decisions: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    log_dir: str = ""
    # Measured / profile-predicted time of the engine's steps ({} when none were saved).
    step_time_ratio: dict[str, float] = field(default_factory=dict)


def prompt_ids_for(vocab_size: int, seed: int):
    """Seeded prompt token ids in the model's vocabulary, the same for every policy."""
    def ids(job_id: str, index: int, n: int) -> list[int]:
        rng = random.Random(f"{seed}:{job_id}:{index}")
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]
    return ids


def _vocab_size(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def run_policy(cfg: VllmBenchConfig, policy: str, jobs: list[JobTrace], model: str,
               base: Path, prompt_ids, log=sys.stderr) -> PolicyRun:
    from astraea.profile import load_profile, step_time_ratio
    from astraea.telemetry.span_files import kv_decision_counts, load_spans
    from astraea.tools.replay import replay
    from astraea.tools.stack import Stack, StackConfig

    span_dir = base / policy / "traces"
    stack_cfg = StackConfig(policy=policy, profile=cfg.profile, time_scale=1.0, workers=1,
                            kv_blocks=cfg.kv_blocks, backend="vllm", model=model,
                            dtype=cfg.dtype, settings=list(cfg.settings),
                            control_plane_listen="127.0.0.1:0",
                            predictor_listen="127.0.0.1:0", log_dir=str(base / policy / "logs"),
                            log_level=cfg.log_level, span_dir=str(span_dir),
                            predictor_state=str(base / policy / "predictor-state.json"))
    started = time.monotonic()
    with Stack(stack_cfg) as st:
        print(f"  [{policy}] stack up in {time.monotonic() - started:.1f} s; replaying "
              f"{len(jobs)} jobs ...", file=log, flush=True)
        res = asyncio.run(replay(jobs, st.control_plane_address, load_profile(cfg.profile),
                                 1.0, log=log, prompt_ids=prompt_ids, stop_ends_job=True))
    counts = kv_decision_counts(load_spans(str(span_dir))) if span_dir.exists() else {}
    steps = step_time_ratio(load_profile(cfg.profile),
                            timed_steps(base / policy / "predictor-state.json"))
    print(f"  [{policy}] {len(jobs) - len(res.errors)}/{len(jobs)} jobs in {res.wall_s:.1f} s; "
          f"({len(res.stopped_early)} ended early by EOS); KV decisions {counts}", file=log,
          flush=True)
    for job_id, err in list(res.errors.items())[:5]:
        print(f"  [{policy}] job {job_id} failed: {err}", file=log)
    if steps:
        print(f"  [{policy}] engine steps took {steps['total']:.2f}x what the cost model "
              f"predicts (median step {steps['median']:.2f}x, {steps['steps']:.0f} steps)",
              file=log, flush=True)
    return PolicyRun(policy, res.summary, res.errors, res.wall_s, res.stopped_early, counts,
                     dict(st.exit_codes), str(st.log_dir), steps)


def timed_steps(state_file: Path) -> list:
    """The (tokens, context tokens read, seconds) of the steps a predictor saved in its state
    file (its last 2,048); [] without one."""
    try:
        return json.loads(state_file.read_text()).get("step_samples") or []
    except (OSError, ValueError):
        return []


def run(cfg: VllmBenchConfig, log=sys.stderr) -> dict:
    """Every policy on the same jobs; the report (see `format_report`)."""
    from worker.vllm.tiny_model import resolve_model

    if cfg.kv_blocks < 1:
        raise ValueError("--kv-blocks must be at least 1")
    if not cfg.policies:
        raise ValueError("--policies: give at least one policy")
    from control_plane.core.config import SchedulerConfig

    SchedulerConfig.from_settings(list(cfg.settings))  # refused before any engine starts
    started = time.monotonic()
    model = Path(resolve_model(cfg.model))
    if not cfg.qps > 0:
        raise ValueError("--qps must be positive")
    jobs = generate_tiny_agent(cfg.jobs, cfg.seed, cfg.qps)
    longest = max(j.total_tokens for j in jobs)
    if longest > cfg.kv_blocks * 32:
        raise ValueError(f"a job of {longest} tokens does not fit {cfg.kv_blocks} blocks of 32")
    base = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="astraea-bench-vllm-"))
    print(f"astraea bench-vllm: {len(jobs)} agent jobs at {cfg.qps:g} QPS (seed {cfg.seed}), "
          f"{sum(len(j.segments) - 1 for j in jobs)} tool calls, {longest} tokens at most; one "
          f"vLLM worker ({model.name}) with {cfg.kv_blocks} KV blocks; logs in {base}",
          file=log, flush=True)
    if cfg.profile == MEASURE:
        cfg = replace(cfg, profile=str(measure_profile(model, base / "profile.json", log,
                                                       cfg.dtype)))
    prompt_ids = prompt_ids_for(_vocab_size(model), cfg.seed)
    runs = [run_policy(cfg, p, jobs, str(model), base, prompt_ids, log) for p in cfg.policies]
    by = {r.policy: r for r in runs}
    # Astraea's mean JCT over each other policy's (below 1: astraea is faster).
    ratios = {}
    if "astraea" in by:
        mine = by["astraea"].summary.get("mean_jct_s", float("nan"))
        ratios = {p: mine / r.summary.get("mean_jct_s", float("nan"))
                  for p, r in by.items() if p != "astraea"}
    return {"config": {**asdict(cfg), "policies": list(cfg.policies), "model": str(model),
                       "settings": list(cfg.settings)},
            "jobs": len(jobs), "runs": [asdict(r) for r in runs],
            "ratio_astraea_over_fcfs": ratios.get("vllm-fcfs"), "astraea_over": ratios,
            "wall_s": time.monotonic() - started}


def measure_profile(model: Path, out: Path, log, dtype: str) -> Path:
    """`astraea profile` of `model` in `dtype` on this machine (its default grid), written to
    `out`."""
    from worker.vllm.profile import measure_to_file

    started = time.monotonic()
    print(f"  measuring the engine on {model.name} in {dtype} (astraea profile) ...", file=log,
          flush=True)
    measure_to_file(str(model), out, name=f"{model.name}-measured", dtype=dtype)
    print(f"  profile in {time.monotonic() - started:.0f} s: {out}", file=log, flush=True)
    return out


def format_report(report: dict) -> str:
    nan = float("nan")
    n = report["jobs"]
    means = {r["policy"]: r["summary"].get("mean_jct_s", nan) for r in report["runs"]}
    fcfs = means.get("vllm-fcfs")
    lines = [f"{'policy':<14}{'jobs done':>11}{'mean JCT s':>12}{'xFCFS':>7}{'p99 JCT s':>11}"
             f"{'preserve':>10}{'swap':>6}{'discard':>9}{'EOS':>6}{'steps/model':>13}"]
    for r in report["runs"]:
        s, kv = r["summary"], r["kv_decisions"]
        x = f"{means[r['policy']] / fcfs:.3f}" if fcfs else "-"
        lines.append(f"{r['policy']:<14}{s.get('jobs_completed', 0):>7d}/{n:<3d}"
                     f"{s.get('mean_jct_s', nan):>12.2f}{x:>7}{s.get('p99_jct_s', nan):>11.2f}"
                     f"{kv.get('preserve', 0):>10d}{kv.get('swap', 0):>6d}"
                     f"{kv.get('discard', 0):>9d}{len(r['stopped_early']):>6d}"
                     f"{r.get('step_time_ratio', {}).get('total', nan):>13.2f}")
    for peer, ratio in report.get("astraea_over", {}).items():
        lines.append(f"mean JCT astraea / {peer} = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    lines.append("steps/model: the engine's timed steps over the cost model's price for them "
                 "(1: the control plane plans with the engine's real speed)")
    if report["config"].get("settings"):
        lines.append(f"scheduling settings: {' '.join(report['config']['settings'])}")
    return "\n".join(lines)
