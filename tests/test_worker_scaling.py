"""Workers added and removed while a trace replays, every service a real process on loopback.

A predictor, a control plane and one simulated worker come up as separate processes; a
generated trace of agent jobs (segments and tool calls) is replayed over gRPC with the SDK.
While it replays two more workers start, then one worker is stopped with SIGTERM (what
`docker compose --scale` and `kubectl scale` send) and another is SIGKILLed, each at a moment
when a segment is running on it with tokens already streamed. Every job completes with, per
segment, exactly the tokens a clean run of the same trace gives (the simulated engine is
deterministic: two clean runs with different worker counts and speeds agree), so no token was
lost or repeated when a segment moved. The control plane's ``segment`` spans say which worker
each admission went to: the added workers ran segments; the SIGTERMed worker drained (the
segment running there finished there, nothing was admitted on it once it asked to leave, and
it exited 0); the segment cut on the SIGKILLed one was admitted again on another worker.

A second test bounds a drain: a worker is SIGTERMed while a long segment runs on it, the only
worker; a job arriving meanwhile waits in the queue. When a short ``--drain-timeout``, or a
second SIGTERM, cuts the drain, the worker exits 0 and the control plane admits the cut
segment again on a worker started since, with no token lost or repeated.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from astraea.client import AsyncAgentClient, FinishReason
from astraea.profile import load_profile
from astraea.telemetry import spans
from astraea.telemetry.span_files import load_spans
from astraea.tools.replay import drive, local_stack
from astraea.tools.stack import CONTROL_PLANE, Stack, StackConfig, log_tail
from astraea.v1 import common_pb2
from astraea.workloads import INFERCEPT_MIX, JobTrace, generate_mix
from control_plane.service.tracing import ADMITTED_EVENT
from worker.process import DRAIN_TIMEOUT_S as DEFAULT_DRAIN_TIMEOUT_S
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY, PROFILE = "astraea", "gptj-6b-a100"
# Real time: a segment of ~40 tokens runs ~0.5 s, long enough to be caught mid-way, and the
# simulated engines cost little CPU on a busy host.
TIME_SCALE = 1.0
# The agent categories whose tools take under a second (calculator, Wikipedia): the trace's
# length is set by its arrivals, not by minutes-long human replies.
MIX = tuple(spec for spec in INFERCEPT_MIX if spec.name in ("math", "qa"))
JOBS, QPS, SEED = 28, 1.6, 11  # arrivals over ~13 s, ~106 segments
MIN_LEFT = 10  # a segment is "mid-way" with tokens streamed and at least this many to come
WAIT_S = 60.0  # generous: the machine may be busy
PROMPT_ID = 1


def _trace() -> list[JobTrace]:
    return generate_mix(JOBS, SEED, qps=QPS, mix=MIX)


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    # The services inherit the environment: no OTLP exports or console spans from tests.
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class _Agents:
    """Runs each job of the trace as an agent would (`drive` calls `run` at its arrival),
    streaming every segment and keeping its tokens."""

    client: AsyncAgentClient
    time_scale: float
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)  # job -> per segment
    # Jobs with a segment streaming now: [tokens received, the segment's budget].
    streaming: dict[str, list[int]] = field(default_factory=dict)

    async def run(self, job: JobTrace) -> bool:
        await self.client.start_job(job.job_id, job.category)
        outputs = self.outputs[job.job_id] = []
        for i, seg in enumerate(job.segments):
            tool = seg.tool.category if seg.tool else None
            stream = self.client.stream_segment(
                job.job_id, prompt_token_ids=[PROMPT_ID] * max(job.new_tokens_before(i), 1),
                max_tokens=seg.output_tokens, temperature=0.0, next_tool_category=tool)
            progress = self.streaming[job.job_id] = [0, seg.output_tokens]
            try:
                async for chunk in stream:
                    progress[0] += len(chunk.token_ids)
            finally:
                del self.streaming[job.job_id]
            outputs.append(stream.result.tokens)
            expected = FinishReason.TOOL_CALL if tool else FinishReason.LENGTH
            if stream.result.finish_reason is not expected:
                raise RuntimeError(f"segment {i} ended with {stream.result.finish_reason}")
            if seg.tool is None:
                break
            async with self.client.tool_call(job.job_id, seg.tool.category):
                await asyncio.sleep(seg.tool.duration_s * self.time_scale)
        await self.client.end_job(job.job_id)
        return False


async def _clean_run(jobs: list[JobTrace], workers: int, time_scale: float) -> dict:
    """The trace on an undisturbed in-process stack: the reference outputs."""
    async with local_stack(POLICY, PROFILE, workers=workers, time_scale=time_scale) as st, \
            AsyncAgentClient(st.address, timeout=WAIT_S) as client:
        agents = _Agents(client, time_scale)
        result = await drive(jobs, load_profile(PROFILE), agents.run, time_scale,
                             log=io.StringIO())
    assert result.errors == {}
    return agents.outputs


def _spawn_worker(address: str, name: str, log_dir: Path, span_dir: Path | None,
                  *extra: str) -> subprocess.Popen:
    """A worker process started by hand, as an orchestrator adding a replica would."""
    env = dict(os.environ)
    if span_dir is not None:
        env["ASTRAEA_TELEMETRY_SPAN_DIR"] = str(span_dir)
    with open(log_dir / f"worker-{name}.log", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.process", "--control-plane", address,
             "--time-scale", repr(TIME_SCALE), "--profile", PROFILE, "--name", name, *extra],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err, start_new_session=True)


def _log_events(path: Path, *events: str) -> list[dict]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in events:
            records.append(record)
    return records


def _worker_ids(cp_log: Path) -> dict[str, int]:
    """Worker name -> the id the control plane gave it (its log, one line per registration)."""
    return {r["worker_name"]: r["worker_id"] for r in _log_events(cp_log, "worker registered")}


async def _until(predicate, what: str, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {seconds:g} s: {what}"
        await asyncio.sleep(0.05)


async def _signal_mid_segment(proc: subprocess.Popen, sig: signal.Signals, worker_id: int,
                              agents: _Agents, replay: asyncio.Task) -> list[tuple[str, int]]:
    """Send `sig` to the worker the moment the control plane says a segment runs on it with
    tokens streamed and at least MIN_LEFT to come. Returns those (job, segment index)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for job_id, (got, budget) in list(agents.streaming.items()):
            if not 0 < got <= budget - MIN_LEFT:
                continue
            index = len(agents.outputs[job_id])
            status = await agents.client.get_job(job_id)
            if (status.state == common_pb2.JOB_STATE_RUNNING and status.HasField("worker_id")
                    and status.worker_id == worker_id and job_id in agents.streaming
                    and agents.streaming[job_id][0] < budget - MIN_LEFT // 2):
                proc.send_signal(sig)
                return [(job_id, index)]
        assert not replay.done(), f"the replay ended before a segment ran on worker {worker_id}"
        assert time.monotonic() < deadline, f"no segment ran mid-way on worker {worker_id}"
        await asyncio.sleep(0.02)


async def _wait_exit(proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + WAIT_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"pid {proc.pid} did not exit"
        await asyncio.sleep(0.05)
    return proc.returncode


@dataclass
class _Scaling:
    """What the replay with scaling saw."""

    outputs: dict
    errors: dict
    ids: dict[str, int]  # worker name -> control-plane id
    cut: dict[str, list[tuple[str, int]]]  # removed worker -> segments running at the signal
    exit_codes: dict[str, int]


async def _replay_while_scaling(st: Stack, jobs: list[JobTrace], span_dir: Path,
                                added: dict[str, subprocess.Popen]) -> _Scaling:
    cp_log = st.log_files[CONTROL_PLANE]
    w1 = next(p.popen for p in st.procs if p.name == "worker-w1")
    async with AsyncAgentClient(st.control_plane_address, timeout=WAIT_S) as client:
        agents = _Agents(client, TIME_SCALE)
        replay = asyncio.create_task(drive(jobs, load_profile(PROFILE), agents.run, TIME_SCALE,
                                           log=io.StringIO()))
        try:
            # Scale up as soon as the first job has started (a worker's start-up takes
            # seconds on a busy host: the replay goes on meanwhile, on w1 alone).
            await _until(lambda: agents.outputs, "the first job started")
            for name in ("w2", "w3"):
                added[name] = _spawn_worker(st.control_plane_address, name, st.log_dir, span_dir)
            await _until(lambda: {"w2", "w3"} <= _worker_ids(cp_log).keys()
                         or any(p.poll() is not None for p in added.values()),
                         "w2 and w3 registered")
            assert not [n for n, p in added.items() if p.poll() is not None], \
                log_tail(st.log_dir / "worker-w2.log") + log_tail(st.log_dir / "worker-w3.log")
            ids = _worker_ids(cp_log)
            # Scale down: a graceful stop of the first worker, then a crash of an added one.
            cut = {"w1": await _signal_mid_segment(w1, signal.SIGTERM, ids["w1"], agents,
                                                   replay)}
            codes = {"w1": await _wait_exit(w1)}
            cut["w2"] = await _signal_mid_segment(added["w2"], signal.SIGKILL, ids["w2"], agents,
                                                  replay)
            codes["w2"] = await _wait_exit(added["w2"])
            result = await asyncio.wait_for(replay, WAIT_S)
        finally:
            replay.cancel()
    return _Scaling(agents.outputs, result.errors, ids, cut, codes)


def _when(text: str) -> datetime:
    """A log line's or a span event's ISO 8601 UTC time (both from this host's clock)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _admission_times(span_dir: Path) -> dict[tuple[str, int], list[tuple[int, datetime]]]:
    """(job, segment index) -> (worker, when) of each of its admissions, in order (the control
    plane's ``segment`` spans, one ``admitted`` event per Admit)."""
    out = {}
    for s in load_spans(str(span_dir)):
        if s.name == spans.SEGMENT and s.service == "astraea-control-plane":
            key = (s.attributes[spans.JOB_ID], s.attributes[spans.SEGMENT_INDEX])
            out[key] = [(e["attributes"][spans.WORKER_ID], _when(e["timestamp"]))
                        for e in s.events if e["name"] == ADMITTED_EVENT]
    return out


def _admissions(span_dir: Path) -> dict[tuple[str, int], list[int]]:
    """(job, segment index) -> the workers its admissions went to, in order."""
    return {key: [w for w, _ in adm] for key, adm in _admission_times(span_dir).items()}


async def _run_all(st: Stack, jobs: list[JobTrace], span_dir: Path,
                   added: dict[str, subprocess.Popen]) -> tuple[dict, dict, _Scaling]:
    """The two clean runs in this process while the stack's processes start (in a thread:
    `Stack.start` blocks), then the replay with scaling; the stack is stopped at the end."""
    starting = asyncio.create_task(asyncio.to_thread(st.start))
    try:
        reference = await _clean_run(jobs, workers=1, time_scale=0.05)
        again = await _clean_run(jobs, workers=3, time_scale=0.1)
        await starting
        assert set(st.pids) == {"predictor", "control-plane", "worker-w1"}
        return reference, again, await _replay_while_scaling(st, jobs, span_dir, added)
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        await asyncio.to_thread(st.stop)


@pytest.mark.timeout(240)
def test_workers_added_and_removed_mid_replay_lose_no_job_and_no_token(tmp_path):
    jobs = _trace()
    assert len(jobs) == JOBS and all(j.api_time_s < 10 for j in jobs)
    span_dir, log_dir = tmp_path / "spans", tmp_path / "logs"
    span_dir.mkdir()
    st = Stack(StackConfig(policy=POLICY, profile=PROFILE, time_scale=TIME_SCALE, workers=1,
                           control_plane_listen="127.0.0.1:0", predictor_listen="127.0.0.1:0",
                           log_dir=str(log_dir), span_dir=str(span_dir),
                           startup_timeout_s=WAIT_S))
    added: dict[str, subprocess.Popen] = {}
    try:
        reference, again, seen = asyncio.run(_run_all(st, jobs, span_dir, added))
        # The control plane's SIGTERM told w3 to leave: it exits by itself, cleanly.
        assert added["w3"].wait(timeout=WAIT_S) == 0
    finally:
        for p in added.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    cp_log = st.log_files[CONTROL_PLANE]

    # The simulated engine is deterministic: one worker and three, at different speeds, give
    # the same tokens, as many per segment as the trace asks for.
    assert again == reference
    assert {j.job_id: [s.output_tokens for s in j.segments] for j in jobs} == {
        job: [len(t) for t in segs] for job, segs in reference.items()}
    # Every job completed, each segment with exactly the clean run's tokens.
    assert seen.errors == {}
    assert seen.outputs == reference
    assert seen.exit_codes == {"w1": 0, "w2": -signal.SIGKILL}
    ids = seen.ids
    # w1 drained: the control plane said so, at its Drain, and when it left; w2 was lost.
    lost = {r["worker_id"] for r in _log_events(cp_log, "worker lost", "worker disconnected")}
    assert ids["w2"] in lost and ids["w1"] not in lost, (lost, ids)
    draining = _log_events(cp_log, "worker draining")
    assert [r["worker_id"] for r in draining] == [ids["w1"]], draining
    assert draining[0]["running_segments"] >= 1  # the segment it was signalled during
    assert [r["worker_id"] for r in _log_events(cp_log, "worker drained")] == [ids["w1"]]
    assert not _log_events(cp_log, "worker left before its drain finished, segments queued "
                                   "again")
    w1_log = st.log_files["worker-w1"]
    assert _log_events(w1_log, "draining") and _log_events(w1_log, "drained"), \
        log_tail(w1_log)
    assert not _log_events(w1_log, "drain timed out, stopping now")

    timed = _admission_times(span_dir)
    admissions = _admissions(span_dir)
    assert set(admissions) == {(j.job_id, i) for j in jobs for i in range(len(j.segments))}
    ran = {w: {key for key, ws in admissions.items() if w in ws} for w in ids.values()}
    # The added workers took work; w3, the one left, ran segments after both removals.
    assert ran[ids["w2"]] and ran[ids["w3"]], {n: len(ran[w]) for n, w in ids.items()}
    # Once w1 asked to leave, nothing more was admitted on it; the others took the new work.
    drain_at = _when(draining[0]["timestamp"])
    later = [(w, key) for key, adm in timed.items() for w, t in adm if t > drain_at]
    assert later and all(w != ids["w1"] for w, _ in later), later
    # The segment running on w1 at its SIGTERM finished there: admitted there last, never
    # elsewhere after it (its tokens, above, are whole and in order).
    for key in seen.cut["w1"]:
        assert admissions[key][-1] == ids["w1"], (key, admissions[key])
    # The segment cut on the SIGKILLed worker was admitted again on another one, and
    # finished there with the tokens already streamed kept.
    gone = ids["w2"]
    for key in seen.cut["w2"]:
        workers = admissions[key]
        assert gone in workers, (key, workers)
        after = workers[len(workers) - workers[::-1].index(gone):]  # after its last
        assert after, (key, workers)


# --- a drain cut short -------------------------------------------------------------------------

LONG_TOKENS = 600  # ~6 s of decoding in real time: far longer than the drain may last
DRAIN_TIMEOUT_S = 3.0


async def _segment(client: AsyncAgentClient, job_id: str, max_tokens: int,
                   progress: list[int] | None = None) -> list[int]:
    """One job of one segment (no tool call), streamed; `progress[0]` counts the tokens."""
    await client.start_job(job_id, "math")
    stream = client.stream_segment(job_id, prompt_token_ids=[PROMPT_ID] * 8,
                                   max_tokens=max_tokens, temperature=0.0)
    async for chunk in stream:
        if progress is not None:
            progress[0] += len(chunk.token_ids)
    await client.end_job(job_id)
    return stream.result.tokens


async def _both_jobs(address: str) -> dict[str, list[int]]:
    async with AsyncAgentClient(address, timeout=WAIT_S) as client:
        long, late = await asyncio.gather(_segment(client, "long", LONG_TOKENS),
                                          _segment(client, "late", 30))
    return {"long": long, "late": late}


async def _drain_cut_short(log_dir: Path, by_signal: bool) -> tuple[dict, dict, int, list[str]]:
    """The clean reference, then the run with the drain cut (by its timeout, or by a second
    SIGTERM); returns both outputs, the SIGTERMed worker's exit code and what was seen."""
    async with local_stack(POLICY, PROFILE, workers=1, time_scale=0.05) as clean:
        reference = await _both_jobs(clean.address)
    seen = []
    async with local_stack(POLICY, PROFILE, workers=0, time_scale=TIME_SCALE) as st, \
            AsyncAgentClient(st.address, timeout=WAIT_S) as client:
        cp = st.server.control_plane
        # Cut by a second signal: the default timeout (25 s) would outlast the segment.
        a = _spawn_worker(st.address, "a", log_dir, None,
                          *([] if by_signal else ["--drain-timeout", repr(DRAIN_TIMEOUT_S)]))
        b_task = None
        try:
            await _until(lambda: cp.registry.workers or a.poll() is not None, "a registered")
            assert a.poll() is None, log_tail(log_dir / "worker-a.log")
            (a_id,) = cp.registry.workers
            progress = [0]
            long = asyncio.create_task(_segment(client, "long", LONG_TOKENS, progress))
            await _until(lambda: progress[0] >= 10 or long.done(), "the long segment started")
            assert (await client.get_job("long")).worker_id == a_id
            a.send_signal(signal.SIGTERM)
            await _until(lambda: cp.registry.workers[a_id].draining is not None,
                         "the control plane saw the drain")
            # The only worker drains: a job arriving now waits in the queue.
            late = asyncio.create_task(_segment(client, "late", 30))
            await _until(lambda: "late" in cp.registry.jobs
                         and cp.registry.jobs["late"].segment is not None, "the late job arrived")
            await asyncio.sleep(0.3)
            status = await client.get_job("late")
            assert status.state == common_pb2.JOB_STATE_READY and not status.HasField(
                "worker_id"), status
            assert a_id in cp.registry.workers  # still draining: the wait was not for lack of one
            seen.append("late queued")
            # Capacity comes back: a new worker takes the queued job, and then the long one
            # when the timeout cuts a's drain.
            b_task = asyncio.create_task(run_worker(
                st.address, SimulatedBackend(load_profile(PROFILE), time_scale=TIME_SCALE), "b"))
            if by_signal:
                await _until(lambda: len(cp.registry.workers) == 2, "b registered")
                a.send_signal(signal.SIGTERM)
            code = await _wait_exit(a)
            outputs = {"long": await asyncio.wait_for(long, WAIT_S),
                       "late": await asyncio.wait_for(late, WAIT_S)}
            (b_id,) = cp.registry.workers
            for job_id in outputs:
                assert (await client.get_job(job_id)).worker_id == b_id, job_id
            seen.append("long finished on b")
        finally:
            if a.poll() is None:
                a.kill()
                a.wait()
    if b_task is not None:  # the control plane's stop told it to leave
        assert await asyncio.wait_for(b_task, WAIT_S) == 0
    return reference, outputs, code, seen


@pytest.mark.timeout(180)
@pytest.mark.parametrize("by_signal", [False, True], ids=["drain-timeout", "second-sigterm"])
def test_a_long_drain_cut_short_loses_nothing(tmp_path, by_signal):
    reference, outputs, code, seen = asyncio.run(_drain_cut_short(tmp_path, by_signal))
    assert seen == ["late queued", "long finished on b"]
    assert len(reference["long"]) == LONG_TOKENS and len(reference["late"]) == 30
    # The cut segment was admitted again on b with the tokens already streamed kept: the
    # client saw exactly the clean run's tokens, once each.
    assert outputs == reference
    assert code == 0
    log = tmp_path / "worker-a.log"
    cut = "stopping now" if by_signal else "drain timed out, stopping now"
    assert _log_events(log, "draining") and _log_events(log, cut), log_tail(log)
    assert not _log_events(log, "drained")


# --- the orchestrators wait for the drain -------------------------------------------------------


def _worker_drain_timeout(command: list[str]) -> float:
    assert command[0] == "astraea-worker", command
    if "--drain-timeout" in command:
        return float(command[command.index("--drain-timeout") + 1])
    return DEFAULT_DRAIN_TIMEOUT_S


def test_orchestrators_give_workers_longer_than_their_drain():
    """compose's stop_grace_period and Kubernetes' terminationGracePeriodSeconds are when
    SIGKILL follows SIGTERM: a worker's drain must end before, or it is cut as a crash."""
    compose = yaml.safe_load((Path(ROOT) / "docker" / "compose.yaml").read_text())
    for name in ("worker", "gpu-worker"):
        service = compose["services"][name]
        grace = service.get("stop_grace_period", "10s")  # docker's default
        assert grace.endswith("s") and grace[:-1].isdigit(), grace
        assert _worker_drain_timeout(service["command"]) < int(grace[:-1]), name
    for path in ("base/worker.yaml", "overlays/gpu/gpu-worker.yaml"):
        manifest = yaml.safe_load((Path(ROOT) / "docker" / "k8s" / path).read_text())
        pod = manifest["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "worker"]
        grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        assert _worker_drain_timeout(container["command"]) < grace, path
