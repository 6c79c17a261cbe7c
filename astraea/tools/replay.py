"""`astraea replay`: drive a live control plane with a trace, and report JCT as `astraea bench`.

Each job starts at its arrival time (relative to the first arrival, times `time_scale`), runs
its segments with placeholder prompt token ids of the trace's lengths, `max_tokens` = the
segment's output tokens and `next_tool_category` = its tool's category, and simulates each tool
by sleeping its duration × `time_scale` between ReportToolCall START and END. `time_scale` is
the factor the control plane and workers run at, so JCTs (wall / time_scale) are in the same
virtual seconds as the simulator's.

`local_stack` starts a control plane and simulated workers in this process on a free loopback
port (`astraea replay --stack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace

from astraea.client import AsyncAgentClient, FinishReason
from astraea.profile import HardwareProfile
from astraea.telemetry import spans
from astraea.tools.sim.metrics import JobRecord, idle_jct_s, summarize
from astraea.workloads.trace import JobTrace

if TYPE_CHECKING:  # imported when a stack starts: the CLI stays light
    from control_plane.service.server import RunningControlPlane

PLACEHOLDER_ID = 1  # the prompt tokens' id: only their number matters to simulated workers
AGENT_SPAN = "agent"  # the replaying client's span of one job: the root of the job's trace


@dataclass
class ReplayResult:
    records: list[JobRecord]
    makespan_s: float  # virtual seconds, first arrival to last finish
    wall_s: float
    errors: dict[str, str]  # job id -> why it failed
    stopped_early: list[str] = field(default_factory=list)  # ended by the model (EOS)

    @property
    def summary(self) -> dict:
        return summarize(self.records, self.makespan_s)


@dataclass
class LocalStack:
    address: str
    server: RunningControlPlane  # its state is `server.control_plane`

    @property
    def decision_counts(self) -> dict:
        """The KV decisions (preserve, swap, discard) the scheduler has made so far."""
        return dict(self.server.control_plane.scheduler.decision_counts)


@contextlib.asynccontextmanager
async def local_stack(policy: str = "astraea", profile: str = "gptj-6b-a100",
                      workers: int = 2, time_scale: float = 1.0,
                      listen: str = "127.0.0.1:0",
                      kv_blocks: int | None = None,
                      scheduler_config=None) -> AsyncIterator[LocalStack]:
    """A control plane (its policy's settings: `scheduler_config`, None: the defaults) and
    `workers` simulated workers in this process; yields a `LocalStack` (its `address`) once
    every worker has registered, and stops them all on exit."""
    from astraea.profile import load_profile
    from control_plane.service.context import ServiceConfig
    from control_plane.service.server import serve
    from worker.process import run_worker
    from worker.sim.backend import SimulatedBackend

    prof = load_profile(profile)
    server = await serve(listen, policy, profile, ServiceConfig(time_scale=time_scale),
                         scheduler_config)
    address = f"127.0.0.1:{server.port}"
    tasks = [asyncio.create_task(run_worker(
        address, SimulatedBackend(prof, time_scale=time_scale, kv_blocks=kv_blocks), f"w{i}"))
        for i in range(workers)]
    try:
        cp = server.control_plane
        deadline = time.monotonic() + 10
        while len(cp.registry.workers) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(cp.registry.workers)} of {workers} workers "
                                   "registered within 10 s")
            if any(t.done() for t in tasks):
                raise RuntimeError("a worker exited before registering")
            await asyncio.sleep(0.01)
        yield LocalStack(address, server)
    finally:
        await server.stop(grace=0.5)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(t, 5)


# The prompt token ids of a job's segment: (job id, segment index, how many) -> ids.
PromptIds = Callable[[str, int, int], list[int]]


def _placeholder_ids(job_id: str, index: int, n: int) -> list[int]:
    return [PLACEHOLDER_ID] * n


async def _run_job(client: AsyncAgentClient, job: JobTrace, time_scale: float,
                   tracer: trace.Tracer, prompt_ids: PromptIds = _placeholder_ids,
                   stop_ends_job: bool = False) -> bool:
    # The client's side of the job's trace: the calls below carry this span's context.
    with tracer.start_as_current_span(AGENT_SPAN, attributes={
            spans.JOB_ID: job.job_id, spans.CATEGORY: job.category}):
        return await _run_job_segments(client, job, time_scale, prompt_ids, stop_ends_job)


async def _run_job_segments(client: AsyncAgentClient, job: JobTrace, time_scale: float,
                            prompt_ids: PromptIds = _placeholder_ids,
                            stop_ends_job: bool = False) -> bool:
    """Run the job; whether the model ended it early (only with `stop_ends_job`)."""
    stopped = False
    await client.start_job(job.job_id, job.category)
    for i, seg in enumerate(job.segments):
        new = max(job.new_tokens_before(i), 1)  # an empty prompt is refused; the sim prefills 1
        category = seg.tool.category if seg.tool else None
        res = await client.run_segment(job.job_id, prompt_token_ids=prompt_ids(job.job_id, i, new),
                                       max_tokens=seg.output_tokens, temperature=0.0,
                                       next_tool_category=category)
        if stop_ends_job and res.finish_reason is FinishReason.STOP:
            stopped = True  # the model ended the job itself (EOS): no more tools
            break
        if len(res.tokens) != seg.output_tokens:
            raise RuntimeError(f"segment {i}: {len(res.tokens)} tokens, expected "
                               f"{seg.output_tokens}")
        if seg.tool is None:
            break
        if res.finish_reason is not FinishReason.TOOL_CALL:
            raise RuntimeError(f"segment {i} ended with {res.finish_reason}, expected TOOL_CALL")
        async with client.tool_call(job.job_id, seg.tool.category):
            await asyncio.sleep(seg.tool.duration_s * time_scale)
    await client.end_job(job.job_id)
    return stopped


async def replay(jobs: list[JobTrace], address: str, profile: HardwareProfile,
                 time_scale: float = 1.0, concurrency: int | None = None,
                 log=None, tracer: trace.Tracer | None = None,
                 prompt_ids: PromptIds | None = None,
                 stop_ends_job: bool = False,
                 credentials: dict | None = None) -> ReplayResult:
    """Replay `jobs` (each with an arrival time) against the control plane at `address`.

    JCT runs from the job's scheduled arrival to its EndJob answer (so a job held back by
    `concurrency` counts that wait), in virtual seconds (wall / time_scale). Each job runs
    in an ``agent`` span of `tracer` (default: the global provider's), the root of its trace.
    `prompt_ids` gives each segment's prompt token ids (default: PLACEHOLDER_ID repeated; a
    real engine wants ids of its vocabulary). A simulated worker never stops a segment early;
    a real model may emit EOS: with `stop_ends_job` such a job ends there (its remaining tool
    calls and segments skipped; `ReplayResult.stopped_early` lists it), otherwise it fails."""
    prompt_ids = prompt_ids or _placeholder_ids
    tracer = tracer or trace.get_tracer("astraea.replay")
    async with AsyncAgentClient(address, **(credentials or {})) as client:
        async def run(job: JobTrace) -> bool:
            try:
                return await _run_job(client, job, time_scale, tracer, prompt_ids,
                                      stop_ends_job)
            except Exception:
                with contextlib.suppress(Exception):
                    await client.cancel_job(job.job_id, "replay error")
                raise

        return await drive(jobs, profile, run, time_scale, concurrency, log)


# One job's run: whether the model ended it early; an exception fails the job (its message
# is reported), not the replay.
JobRunner = Callable[[JobTrace], Awaitable[bool]]


async def drive(jobs: list[JobTrace], profile: HardwareProfile, run: JobRunner,
                time_scale: float = 1.0, concurrency: int | None = None,
                log=None) -> ReplayResult:
    """Start each job at its arrival (relative to the first, times `time_scale`) with `run`,
    at most `concurrency` at once, and time it: the replay loop of every client path (gRPC
    here, the OpenAI API in replay_http.py)."""
    if any(j.arrival_s is None for j in jobs):
        raise ValueError("every job needs an arrival time (give --qps for traces without)")
    if not time_scale > 0:
        raise ValueError(f"--time-scale must be positive, got {time_scale}")
    log = log if log is not None else sys.stderr
    t0_trace = min(j.arrival_s for j in jobs) if jobs else 0.0
    records = {j.job_id: JobRecord(j.job_id, j.category, j.arrival_s - t0_trace,
                                   idle_jct_s=idle_jct_s(j, profile), api_s=j.api_time_s,
                                   output_tokens=j.output_tokens) for j in jobs}
    errors: dict[str, str] = {}
    stopped_early: list[str] = []
    sem = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    done = 0
    start = time.monotonic()

    async def one(job: JobTrace) -> None:
        nonlocal done
        rec = records[job.job_id]
        await asyncio.sleep(max(0.0, start + rec.arrival_s * time_scale - time.monotonic()))
        try:
            async with sem:
                ended = await run(job)
        except Exception as e:  # noqa: BLE001 — one failed job is reported, not fatal
            errors[job.job_id] = str(e) or type(e).__name__
            return
        rec.finish_s = (time.monotonic() - start) / time_scale
        if ended:
            stopped_early.append(job.job_id)
        done += 1
        if done % 100 == 0:
            print(f"  replay: {done}/{len(jobs)} jobs done", file=log, flush=True)

    await asyncio.gather(*(one(j) for j in jobs))
    wall = time.monotonic() - start
    finished = [r.finish_s for r in records.values() if r.finish_s == r.finish_s]
    return ReplayResult(list(records.values()), max(finished, default=0.0), wall, errors,
                        sorted(stopped_early))


def scrape_kv_decisions(metrics_url: str, timeout_s: float = 5.0) -> dict[str, int]:
    """The KV decisions a control plane has made, read from its Prometheus endpoint, keyed as
    `Scheduler.decision_counts` is ("swap", "reclaim_swap", "preempt_discard", ...)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from astraea.plan import decision_key

    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        text = r.read().decode()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "astraea_kv_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = decision_key(sample.labels["action"], sample.labels["cause"])
                counts[key] = int(sample.value)
    return counts


def run_row(result: ReplayResult, policy_label: str, qps: float | None, seed: int,
            jobs: int, decision_counts: dict | None = None) -> dict:
    """A run dict shaped like `astraea bench`'s (astraea.tools.bench.run.run_one) for the report;
    KV decision counts when known."""
    row = {"policy": policy_label, "qps": qps, "seed": seed, **result.summary, "jobs": jobs,
           "sim_wall_s": result.wall_s, "errors": len(result.errors)}
    if decision_counts is not None:
        for k in ("preserve", "swap", "discard", "reclaim_swap", "reclaim_discard",
                  "preempt_swap", "preempt_discard"):
            row["kv_" + k] = decision_counts.get(k, 0)
    return row


def replay_jobs(trace: str, n: int | None, qps: float | None, seed: int,
                context_window: int) -> tuple[list[JobTrace], float | None]:
    """The jobs to replay: the trace (or 'infercept': the generated mix), cut or cycled to
    `n`, with Poisson arrivals at `qps` when it has none. Returns them and the QPS used (None:
    the trace's own arrivals)."""
    from astraea.workloads import generate_mix, load_trace, take_jobs, with_poisson_arrivals

    if trace == "infercept":
        if n is None:
            raise ValueError("the generated 'infercept' mix needs --jobs")
        if qps is None:
            raise ValueError("the generated 'infercept' mix needs --qps")
        return generate_mix(n, seed, qps=qps, context_window=context_window), qps
    jobs = load_trace(trace)
    jobs = take_jobs(jobs, n if n is not None else len(jobs), context_window)
    if all(j.arrival_s is not None for j in jobs):
        return jobs, None
    if qps is None:
        raise ValueError(f"{trace} has no arrival times: give --qps")
    return with_poisson_arrivals(jobs, qps, seed), qps
