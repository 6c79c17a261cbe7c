"""`astraea bench-gateway`: the OpenAI gateway against the gRPC path, side by side in one run.

Two measurements, each on stacks of separate processes (as `astraea up --http` starts them:
predictor, control plane, simulated workers, gateway):

1. **JCT**: the same trace replayed through gRPC (`astraea.tools.replay`) and through the
   Chat Completions API (`astraea.tools.replay_http`), each on a fresh stack, so neither run
   inherits the other's learnt estimates. The means should agree: the gateway adds a few
   milliseconds per request, the trace's segments last seconds.
2. **Per-request cost**: closed-loop clients each running one-segment jobs back to back —
   over gRPC StartJob + RunSegment + EndJob, over HTTP one chat completion that closes its
   session (the gateway makes the same three calls). Latency p50/p99 and requests/s of
   each path, on one stack whose simulated engine is almost free (`time_scale` tiny), so the
   difference is what the gateway adds. The load generator shares the machine's cores with
   the services: requests/s is a floor, not the gateway's ceiling.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass

from astraea.profile import load_profile


@dataclass
class GatewayBenchConfig:
    trace: str = "infercept"
    jobs: int = 200
    qps: float = 2.0
    seed: int = 0
    time_scale: float = 0.05
    workers: int = 2
    policy: str = "astraea"
    profile: str = "gptj-6b-a100"
    requests: int = 600  # per path, in the per-request measurement
    concurrency: int = 8  # closed-loop clients in the per-request measurement
    prompt_tokens: int = 16
    output_tokens: int = 4
    skip_jct: bool = False


def _stack_config(cfg: GatewayBenchConfig, time_scale: float, kv_blocks: int | None = None):
    from astraea.tools.stack import StackConfig

    return StackConfig(policy=cfg.policy, profile=cfg.profile, time_scale=time_scale,
                       workers=cfg.workers, kv_blocks=kv_blocks,
                       control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                       http_listen="127.0.0.1:0")


def _tokenizer() -> str:
    from worker.vllm.tiny_model import resolve_tokenizer

    return resolve_tokenizer(None)  # what the stack's gateway renders with, given no model


def _jct(cfg: GatewayBenchConfig, log) -> dict:
    from astraea.tools.replay import replay, replay_jobs, run_row
    from astraea.tools.replay_http import HttpTarget, replay_http
    from astraea.tools.stack import Stack

    profile = load_profile(cfg.profile)
    jobs, qps = replay_jobs(cfg.trace, cfg.jobs, cfg.qps, cfg.seed, profile.context_window)
    rows = {}
    for path in ("grpc", "http"):
        print(f"  [{path}] replaying {len(jobs)} jobs ...", file=log, flush=True)
        with Stack(_stack_config(cfg, cfg.time_scale)) as st:
            if path == "grpc":
                res = asyncio.run(replay(jobs, st.control_plane_address, profile,
                                         cfg.time_scale, log=log))
            else:
                target = HttpTarget(f"{st.http_address}/v1", st.config.served_model)
                res = asyncio.run(replay_http(jobs, target, _tokenizer(), profile,
                                              cfg.time_scale, log=log))
        rows[path] = run_row(res, path, qps, cfg.seed, len(jobs))
        rows[path]["error_examples"] = dict(list(res.errors.items())[:3])
    return rows


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _closed_loop(n: int, concurrency: int, one) -> dict:
    """`n` calls of `one()` by `concurrency` clients back to back: latencies and rate."""
    lat: list[float] = []
    errors: list[str] = []
    left = n

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            try:
                await one()
            except Exception as e:  # noqa: BLE001 — counted and shown, the run goes on
                errors.append(f"{type(e).__name__}: {e}")
                continue
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"requests": len(lat), "errors": len(errors), "error_examples": errors[:3],
            "p50_ms": 1e3 * _quantile(lat, 0.5), "p99_ms": 1e3 * _quantile(lat, 0.99),
            "mean_ms": 1e3 * sum(lat) / len(lat) if lat else float("nan"),
            "requests_per_s": len(lat) / wall if wall > 0 else float("nan")}


async def _per_request(cfg: GatewayBenchConfig, grpc_address: str, base_url: str,
                       model: str) -> dict:
    import httpx
    import openai

    from astraea.client import AsyncAgentClient
    from astraea.tools.replay_http import PromptText

    ids = [1] * cfg.prompt_tokens
    text = PromptText(_tokenizer()).message(cfg.prompt_tokens, first=True)
    close = {"nvext": {"session_control": {"action": "close"}}}
    out: dict = {}
    async with AsyncAgentClient(grpc_address) as agent:
        async def grpc_one() -> None:
            job = await agent.start_job(category="bench")
            await agent.run_segment(job, prompt_token_ids=ids, max_tokens=cfg.output_tokens,
                                    temperature=0.0)
            await agent.end_job(job)

        await _closed_loop(min(50, cfg.requests), cfg.concurrency, grpc_one)  # warm up
        out["grpc"] = await _closed_loop(cfg.requests, cfg.concurrency, grpc_one)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=cfg.concurrency * 2))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                  http_client=http) as client:
        async def http_one() -> None:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}],
                max_tokens=cfg.output_tokens, temperature=0.0, extra_body=close)

        await _closed_loop(min(50, cfg.requests), cfg.concurrency, http_one)
        out["http"] = await _closed_loop(cfg.requests, cfg.concurrency, http_one)
    return out


def run(cfg: GatewayBenchConfig, log=None) -> dict:
    from astraea.tools.stack import Stack

    log = log if log is not None else sys.stderr
    report: dict = {"config": asdict(cfg)}
    if not cfg.skip_jct:
        report["jct"] = _jct(cfg, log)
    print(f"  per-request: {cfg.requests} requests per path, {cfg.concurrency} clients ...",
          file=log, flush=True)
    # A big pool and a tiny time scale: the engine is not what is measured.
    with Stack(_stack_config(cfg, 0.001, kv_blocks=200_000)) as st:
        report["per_request"] = asyncio.run(_per_request(
            cfg, st.control_plane_address, f"{st.http_address}/v1", st.config.served_model))
    return report


def format_report(report: dict) -> str:
    lines = []
    jct = report.get("jct")
    if jct:
        g, h = jct["grpc"], jct["http"]
        lines.append(f"{'path':<6}{'jobs done':>10}{'mean JCT':>10}{'p50':>9}{'p99':>9}")
        for name, row in (("grpc", g), ("http", h)):
            lines.append(f"{name:<6}{row.get('jobs_completed', 0):>10d}"
                         f"{row.get('mean_jct_s', float('nan')):>10.2f}"
                         f"{row.get('p50_jct_s', float('nan')):>9.2f}"
                         f"{row.get('p99_jct_s', float('nan')):>9.2f}")
        ratio = h.get("mean_jct_s", float("nan")) / g.get("mean_jct_s", float("nan"))
        lines.append(f"mean JCT http/grpc: {ratio:.3f}")
        lines.append("")
    pr = report["per_request"]
    lines.append(f"{'path':<6}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}"
                 f"{'req/s':>9}")
    for name in ("grpc", "http"):
        r = pr[name]
        lines.append(f"{name:<6}{r['requests']:>9d}{r['errors']:>7d}{r['p50_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}{r['requests_per_s']:>9.1f}")
    lines.append(f"gateway adds p50 {pr['http']['p50_ms'] - pr['grpc']['p50_ms']:.2f} ms, "
                 f"p99 {pr['http']['p99_ms'] - pr['grpc']['p99_ms']:.2f} ms per request")
    return "\n".join(lines)
