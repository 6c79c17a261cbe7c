"""`astraea chaos`: replay a trace while SIGKILLing, in turn, a worker, the predictor, the
gateway and the control plane, and check every job's tokens against a clean run.

Two runs, each on a fresh stack of processes (`astraea.tools.stack.Stack`: predictor, control
plane with durable state, simulated workers, OpenAI gateway with its own state directory unless
`gateway_state` is off):

1. **clean**: the trace replayed with nothing killed; every job's tokens recorded per segment.
2. **chaos**: the same trace, while one service at a time is SIGKILLed; the stack's supervisor
   (`Stack.supervise`, as `astraea up` runs it) starts it again; once it is healthy (gRPC
   health SERVING, the gateway's /health, a worker registered again; after the control plane,
   every worker registered with it again) and `interval_s` has passed, the next one goes.

Most jobs run over gRPC with `AsyncAgentClient` and a `RetryPolicy` (UNAVAILABLE retried,
cut RunSegment streams resumed at the tokens received). Every `http_every`-th job runs through
the gateway with the official `openai` SDK: one session per job, named by `X-Session-ID`; a
request that fails for want of a server (connection refused or reset, 5xx, 409 busy, 429) is
sent again whole, with the same session id. A session whose turn failed (the control plane
restarted under it: the gateway's own calls do not retry) or whose gateway restarted without
it goes on in a new job, the whole conversation as its prompt; the report counts such sessions
("moved to a new job") and the jobs they leave open rather than hiding them.

What is compared. The simulated engine's token at index i of a segment is
`placeholder_token(job_id, i)`: it depends on the job id and the index only, not on timing,
worker or batch. gRPC jobs carry the trace's job ids in both runs, so their token ids are
compared exactly, segment by segment. The gateway names its jobs itself (a fresh id per job,
another after a restart) and answers text, not ids: an HTTP segment passes when its token
count equals the clean run's and its text is exactly the decoding of the engine's sequence for
the job the gateway reports (`X-Astraea-Job-ID`) — the same sequence relative to its job, none
lost, none repeated — in both runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from astraea.client import AsyncAgentClient, RetryPolicy
from astraea.profile import HardwareProfile, load_profile
from astraea.tools.replay import PLACEHOLDER_ID, drive
from astraea.tools.stack import CONTROL_PLANE, GATEWAY, PREDICTOR, Stack, StackConfig
from astraea.workloads.trace import JobTrace

if TYPE_CHECKING:
    from astraea.tools.chaos_report import ChaosReport

WORKER = "worker"
KILLABLE = (WORKER, PREDICTOR, GATEWAY, CONTROL_PLANE)  # the default order of the kills
HEALTHY_WAIT_S = 90.0  # a restart on a busy host can take a while; longer counts as failed
RETRY = RetryPolicy(total_s=120.0, max_backoff_s=1.0)  # rides out any one restart
HTTP_RETRY_S = 120.0
STREAM_WAIT_S = 5.0  # how long a kill waits for a segment to be streaming
STARTUP_WAIT_S = 180.0  # each service imports a lot; a loaded host makes that slow


@dataclass
class ChaosOptions:
    """What `run_chaos` replays and kills (the flags of `astraea chaos`)."""

    jobs: list[JobTrace]
    time_scale: float = 0.2
    kills: tuple[str, ...] = KILLABLE
    interval_s: float = 3.0  # wall seconds from the replay's start, then after each recovery
    http_every: int = 4  # every N-th job goes through the gateway (0: none)
    workers: int = 2
    policy: str = "astraea"
    profile: str = "gptj-6b-a100"
    log_dir: str | None = None
    clean_time_scale: float | None = None  # None: time_scale (tokens do not depend on it)
    parallel: bool = False  # the clean run beside the chaos run (see run_chaos)
    # The gateway keeps its named sessions in a state directory (False: in memory, so a
    # restart loses them and each session's next request starts a new job).
    gateway_state: bool = True

    def __post_init__(self) -> None:
        unknown = [k for k in self.kills if k not in KILLABLE]
        if unknown:
            raise ValueError(f"--kills: unknown service(s) {', '.join(unknown)} (known: "
                             f"{', '.join(KILLABLE)})")
        if not self.jobs:
            raise ValueError("no jobs to replay")
        if not self.time_scale > 0 or (self.clean_time_scale is not None
                                       and not self.clean_time_scale > 0):
            raise ValueError("--time-scale must be positive")
        if self.interval_s < 0:
            raise ValueError(f"--interval must be at least 0, got {self.interval_s}")
        if self.http_every < 0:
            raise ValueError(f"--http-every must be at least 0, got {self.http_every}")
        if WORKER in self.kills and self.workers < 1:
            raise ValueError("killing a worker needs --workers of at least 1")
        if GATEWAY in self.kills and not self.http_every:
            raise ValueError("killing the gateway needs HTTP jobs (--http-every > 0)")


@dataclass
class SegmentTokens:
    """One segment as a client received it."""

    served_by: str  # the job id that generated it (HTTP: the gateway's job)
    count: int
    tokens: list[int] | None = None  # gRPC: the ids, in order
    text_ok: bool | None = None  # HTTP: the text is the engine's sequence for `served_by`


@dataclass
class JobTokens:
    job_id: str
    path: str  # "grpc" or "http"
    segments: list[SegmentTokens] = field(default_factory=list)
    error: str | None = None
    retries: int = 0  # HTTP requests sent again
    # The jobs that served it that the control plane still holds open after the replay
    # (GetJob: not finished). HTTP: a session moved to a new job leaves its old one open
    # unless the gateway ended it (the control plane's API-wait timeout ends it later).
    left_open: list[str] = field(default_factory=list)

    @property
    def jobs_used(self) -> int:
        """How many control-plane jobs served it (HTTP: more than one when the session was
        moved to a new job)."""
        return len({s.served_by for s in self.segments})


@dataclass
class KillRecord:
    service: str  # the process name, e.g. worker-w1
    at_s: float  # wall seconds since the replay began
    in_flight_grpc: int  # jobs started and not yet ended at the kill
    in_flight_http: int
    streaming: int = 0  # gRPC jobs mid-segment (tokens arriving) at the kill
    recovered_s: float | None = None  # kill to healthy again; None: not within the wait
    retries: int = 0  # failed attempts the clients retried, from this kill to the next
    streams_cut: int = 0  # of which RunSegment streams cut mid-segment (resumed)
    # The control plane only: jobs its new process restored from the store, and how many of
    # them were cut mid-segment with tokens already stored.
    restored: int | None = None
    restored_mid_segment: int | None = None
    skipped: str | None = None  # why it did not happen (the replay was over)


@dataclass
class RunResult:
    jobs: dict[str, JobTokens]
    kills: list[KillRecord]
    wall_s: float
    log_dir: str
    supervisor: list[str]  # what the supervisor did, a line each


class _Counter:
    """Failed attempts the clients will retry (gRPC UNAVAILABLE, HTTP), for the kill table,
    and the RunSegment streams among them cut after tokens had arrived (then resumed)."""

    def __init__(self) -> None:
        self.total = 0
        self.streams_cut = 0


class _CountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the unary calls that end UNAVAILABLE: each is an attempt the RetryPolicy
    retries. (grpc.aio files an interceptor under one kind only: one class per kind.)"""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    async def intercept_unary_unary(self, continuation, details, request):
        call = await continuation(details, request)
        try:
            await call
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                self.counter.total += 1
        return call


class _CountStreams(grpc.aio.UnaryStreamClientInterceptor):
    """Counts the RunSegment streams that end UNAVAILABLE, and those cut after tokens came."""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    async def intercept_unary_stream(self, continuation, details, request):
        call = await continuation(details, request)

        async def events():
            received = False
            try:
                async for ev in call:
                    received = True
                    yield ev
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.UNAVAILABLE:
                    self.counter.total += 1
                    self.counter.streams_cut += received
                raise
            finally:
                call.cancel()
        return events()


# -- one job each way ----------------------------------------------------------------------
async def _grpc_job(client: AsyncAgentClient, job: JobTrace, time_scale: float,
                    rec: JobTokens, streaming: set[str]) -> None:
    jid = rec.job_id
    await client.start_job(jid, job.category)
    for i, seg in enumerate(job.segments):
        new = max(job.new_tokens_before(i), 1)
        stream = client.stream_segment(
            jid, prompt_token_ids=[PLACEHOLDER_ID] * new, max_tokens=seg.output_tokens,
            temperature=0.0, next_tool_category=seg.tool.category if seg.tool else None)
        try:
            async for _ in stream:
                streaming.add(jid)  # mid-segment, tokens received: a kill now cuts it
        finally:
            streaming.discard(jid)
        res = stream.result
        rec.segments.append(SegmentTokens(jid, len(res.tokens), tokens=list(res.tokens)))
        if seg.tool is None:
            break
        async with client.tool_call(jid, seg.tool.category):
            await asyncio.sleep(seg.tool.duration_s * time_scale)
    await client.end_job(jid)


class _Http:
    """The HTTP leg's shared parts: the SDK client, prompt text, the decoder."""

    def __init__(self, base_url: str, model: str, tokenizer: str, counter: _Counter) -> None:
        import httpx
        import openai

        from astraea.tools.replay_http import PromptText
        from gateway.chat import ChatTokenizer

        self.openai = openai
        self.decoder = ChatTokenizer(tokenizer)  # decodes ids as the gateway does
        self.text = PromptText(tokenizer, self.decoder.tok)
        self.model = model
        self.counter = counter
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000),
                                 timeout=httpx.Timeout(None, connect=5.0))
        # No SDK retries: this leg retries itself, and counts.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                         http_client=http)

    def retryable(self, e: Exception) -> bool:
        o = self.openai
        if isinstance(e, o.APIConnectionError):  # refused, reset, or the gateway died mid-way
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code >= 500
                                                    or e.status_code in (409, 429))

    async def request(self, rec: JobTokens, **kwargs):
        deadline = time.monotonic() + HTTP_RETRY_S
        delay = 0.1
        while True:
            try:
                raw = await self.client.chat.completions.with_raw_response.create(**kwargs)
                return raw.parse(), raw.headers.get("x-astraea-job-id", "")
            except Exception as e:
                if not self.retryable(e) or time.monotonic() > deadline:
                    raise
            self.counter.total += 1
            rec.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def text_ok(self, content: str, job_id: str, n: int) -> bool:
        """Whether `content` is the engine's first `n` tokens for `job_id`, decoded as the
        gateway decodes them; a trailing U+FFFD (bytes of a character the budget cut) may be
        dropped, as the gateway does, like vLLM's detokenizer."""
        from worker.sim.backend import placeholder_token

        text = self.decoder.decode([placeholder_token(job_id, i) for i in range(n)])
        return content in (text, text.rstrip("\ufffd"))


async def _http_job(h: _Http, job: JobTrace, time_scale: float, rec: JobTokens) -> None:
    from astraea.tools.replay_http import SESSION_HEADER, turn_body

    messages: list[dict] = []
    for i, seg in enumerate(job.segments):
        new = max(job.new_tokens_before(i), 1)
        messages.append({"role": "user", "content": h.text.message(new, first=i == 0)})
        done, served_by = await h.request(
            rec, model=h.model, messages=messages, max_tokens=seg.output_tokens,
            temperature=0.0, extra_headers={SESSION_HEADER: rec.job_id},
            extra_body=turn_body(job, i))
        n = done.usage.completion_tokens if done.usage else -1
        content = done.choices[0].message.content or ""
        rec.segments.append(SegmentTokens(served_by, n,
                                          text_ok=h.text_ok(content, served_by, n)))
        messages.append({"role": "assistant", "content": content})
        if seg.tool is None:
            return
        await asyncio.sleep(seg.tool.duration_s * time_scale)


# -- one run ---------------------------------------------------------------------------------
def run_once(opts: ChaosOptions, name: str, kills: tuple[str, ...], time_scale: float,
             base: Path, log=sys.stderr) -> RunResult:
    """Replay the jobs on a fresh stack (logs in base/name), killing `kills` in turn."""
    http = opts.http_every > 0
    cfg = StackConfig(policy=opts.policy, profile=opts.profile, time_scale=time_scale,
                      workers=opts.workers, control_plane_listen="127.0.0.1:0",
                      predictor_listen="127.0.0.1:0",
                      http_listen="127.0.0.1:0" if http else None,
                      log_dir=str(base / name), state_dir="state", log_level="info",
                      gateway_state_dir="gateway-state" if opts.gateway_state else None,
                      startup_timeout_s=STARTUP_WAIT_S)
    t = time.monotonic()
    with Stack(cfg) as st:
        print(f"[{name}] stack up in {time.monotonic() - t:.1f} s (logs in {st.log_dir}); "
              f"replaying {len(opts.jobs)} jobs" + (f", killing {', '.join(kills)} in turn"
                                                    if kills else ""), file=log, flush=True)
        tokenizer = _tokenizer() if http else None
        result = asyncio.run(_replay(st, opts, kills, time_scale, tokenizer, log, name))
        t = time.monotonic()
    bad = {n: c for n, c in st.exit_codes.items() if c != 0}
    print(f"[{name}] replay done in {result.wall_s:.1f} s; stack stopped in "
          f"{time.monotonic() - t:.1f} s" + (f" (non-zero exits: {bad})" if bad else ""),
          file=log, flush=True)
    return result


def _tokenizer() -> str:
    from worker.vllm.tiny_model import resolve_tokenizer

    return resolve_tokenizer(None)  # what the stack's gateway renders prompts with


async def _replay(st: Stack, opts: ChaosOptions, kills: tuple[str, ...], time_scale: float,
                  tokenizer: str | None, log, name: str) -> RunResult:
    profile: HardwareProfile = load_profile(opts.profile)
    counter = _Counter()
    records: dict[str, JobTokens] = {}
    for k, job in enumerate(opts.jobs):
        path = "http" if opts.http_every and k % opts.http_every == opts.http_every - 1 \
            else "grpc"
        records[job.job_id] = JobTokens(f"chaos-{job.job_id}", path)
    # Jobs started and not ended, by path; "streaming": gRPC jobs mid-segment.
    in_flight: dict[str, set[str]] = {"grpc": set(), "http": set(), "streaming": set()}
    channel = grpc.aio.insecure_channel(st.control_plane_address,
                                        interceptors=[_CountUnary(counter),
                                                      _CountStreams(counter)])
    client = AsyncAgentClient(channel=channel, timeout=30.0, segment_timeout=None)
    client.retry = RETRY
    h = _Http(f"{st.http_address}/v1", st.config.served_model, tokenizer, counter) \
        if tokenizer else None

    async def run(job: JobTrace) -> bool:
        rec = records[job.job_id]
        in_flight[rec.path].add(job.job_id)
        try:
            if rec.path == "http":
                await _http_job(h, job, time_scale, rec)
            else:
                await _grpc_job(client, job, time_scale, rec, in_flight["streaming"])
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            in_flight[rec.path].discard(job.job_id)
        return False

    supervisor: list[str] = []
    replay_over = asyncio.Event()
    start = time.monotonic()
    sup = asyncio.create_task(_supervise(st, supervisor, log, name))
    chaos = asyncio.create_task(_kill_in_turn(st, kills, opts.interval_s, in_flight, counter,
                                              replay_over, start, log, name))
    try:
        result = await drive(opts.jobs, profile, run, time_scale, None, log)
        replay_over.set()
        kill_records = await chaos
        await _left_open(client, records.values())
    finally:
        replay_over.set()
        for task in (chaos, sup):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await channel.close()
        if h is not None:
            await h.client.close()
    for job_id, err in result.errors.items():
        records[job_id].error = records[job_id].error or err
    return RunResult(records, kill_records, time.monotonic() - start, str(st.log_dir),
                     supervisor)


async def _left_open(client: AsyncAgentClient, records) -> None:
    """Ask the control plane about every job that served a record: which are not finished."""
    from astraea.client import AstraeaError

    for rec in records:
        for jid in dict.fromkeys(s.served_by for s in rec.segments):
            try:
                status = await client.get_job(jid)
            except AstraeaError as e:
                if e.code is not grpc.StatusCode.NOT_FOUND:
                    raise
                continue  # forgotten: finished longer ago than the retention window
            if not status.finished_unix_s:
                rec.left_open.append(jid)


async def _supervise(st: Stack, lines: list[str], log, name: str) -> None:
    """`astraea up`'s supervision loop: restart what exited."""
    while True:
        for line in st.supervise():
            lines.append(line)
            print(f"[{name}] supervisor: {line}", file=log, flush=True)
        await asyncio.sleep(0.1)


async def _kill_in_turn(st: Stack, kills: tuple[str, ...], interval_s: float,
                        in_flight: dict[str, set[str]], counter: _Counter,
                        over: asyncio.Event, start: float, log, name: str) -> list[KillRecord]:
    records: list[KillRecord] = []
    marks: list[tuple[int, int]] = []  # the counter at each kill
    workers = [p.name for p in st.procs if p.name.startswith("worker-")]
    for n, kind in enumerate(kills):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(over.wait(), interval_s)
        target = workers[sum(k == WORKER for k in kills[:n]) % len(workers)] \
            if kind == WORKER else kind
        if over.is_set():
            records.append(KillRecord(target, time.monotonic() - start, 0, 0,
                                      skipped="the replay was over"))
            continue
        # Kill as a segment streams, if one does within a while: cut streams must resume.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_some(in_flight["streaming"], over), STREAM_WAIT_S)
        if over.is_set():
            records.append(KillRecord(target, time.monotonic() - start, 0, 0,
                                      skipped="the replay was over"))
            continue
        proc = next(p for p in st.procs if p.name == target)
        registered = {w: _registrations(st, w) for w in workers}
        rec = KillRecord(target, time.monotonic() - start, len(in_flight["grpc"]),
                         len(in_flight["http"]), len(in_flight["streaming"]))
        before = (counter.total, counter.streams_cut)
        os.kill(proc.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        print(f"[{name}] SIGKILL {target} (pid {proc.popen.pid}) at {rec.at_s:.1f} s, "
              f"{rec.in_flight_grpc} gRPC ({rec.streaming} streaming) + {rec.in_flight_http} "
              "HTTP jobs in flight",
              file=log, flush=True)
        log_at = st.log_files[target].stat().st_size
        if await _healthy(st, target, proc.popen.pid, registered):
            rec.recovered_s = time.monotonic() - killed
            if target == CONTROL_PLANE:
                restored = _logged_since(st.log_files[target], log_at, "job restored")
                rec.restored = len(restored)
                rec.restored_mid_segment = sum(r.get("stored_tokens", 0) > 0 for r in restored)
            print(f"[{name}] {target} healthy again after {rec.recovered_s:.1f} s", file=log,
                  flush=True)
        else:
            print(f"[{name}] {target} not healthy within {HEALTHY_WAIT_S:g} s", file=log,
                  flush=True)
        records.append(rec)
        marks.append(before)
    await over.wait()
    # Retries seen in each kill's window: from it to the next kill (the last: to the end).
    marks.append((counter.total, counter.streams_cut))
    for rec, (a, b) in zip((r for r in records if not r.skipped), zip(marks, marks[1:])):
        rec.retries, rec.streams_cut = b[0] - a[0], b[1] - a[1]
    return records


async def _some(jobs: set[str], over: asyncio.Event) -> None:
    while not jobs and not over.is_set():
        await asyncio.sleep(0.005)


def _logged_since(path: Path, offset: int, event: str) -> list[dict]:
    """The JSON log lines of `event` written after `offset` bytes."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            if (r := json.loads(line)).get("event") == event:
                found.append(r)
    return found


def _registrations(st: Stack, worker: str) -> int:
    path = st.log_files[worker]
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    return text.count('"event": "registered"')


async def _healthy(st: Stack, target: str, old_pid: int, registered: dict[str, int]) -> bool:
    """Wait until `target` runs again (a new process) and serves; False after the wait."""
    deadline = time.monotonic() + HEALTHY_WAIT_S
    proc = next(p for p in st.procs if p.name == target)
    while time.monotonic() < deadline:
        if proc.popen.pid != old_pid and proc.popen.poll() is None \
                and await _serves(st, target, registered):
            return True
        await asyncio.sleep(0.05)
    return False


async def _serves(st: Stack, target: str, registered: dict[str, int]) -> bool:
    if target.startswith("worker-"):
        return _registrations(st, target) > registered[target]
    if target == GATEWAY:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=1.0) as c:
                return (await c.get(f"{st.http_address}/health")).status_code == 200
        except httpx.HTTPError:
            return False
    address = st.control_plane_address if target == CONTROL_PLANE else st.predictor_address
    if not await _serving(address):
        return False
    # The control plane serves jobs once its workers are back: each registers again.
    return target != CONTROL_PLANE or all(_registrations(st, w) > n
                                          for w, n in registered.items())


async def _serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


# -- both runs -------------------------------------------------------------------------------
def run_chaos(opts: ChaosOptions, log=sys.stderr) -> ChaosReport:
    """The clean run, the chaos run, and their comparison. With `opts.parallel` the clean run
    goes on in a thread beside the chaos run (on its own stack): less wall time, a busier
    host for the chaos run's recoveries."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from astraea.tools.chaos_report import ChaosReport, compare_job

    base = Path(opts.log_dir) if opts.log_dir else Path(tempfile.mkdtemp(prefix="astraea-chaos-"))
    clean_scale = opts.clean_time_scale or opts.time_scale
    if opts.parallel:
        if opts.http_every:
            # transformers resolves its names lazily, which two threads cannot do at once.
            from transformers import PreTrainedTokenizerFast  # noqa: F401

            _tokenizer()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(run_once, opts, "clean", (), clean_scale, base, log)
            chaos = run_once(opts, "chaos", opts.kills, opts.time_scale, base, log)
            clean = pending.result()
    else:
        clean = run_once(opts, "clean", (), clean_scale, base, log)
        chaos = run_once(opts, "chaos", opts.kills, opts.time_scale, base, log)
    differences = {}
    for jid, rec in chaos.jobs.items():
        why = compare_job(clean.jobs[jid], rec)
        if why is not None:
            differences[jid] = why
    options = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "jobs"}
    options["jobs"] = len(opts.jobs)
    return ChaosReport(clean, chaos, differences, options)
