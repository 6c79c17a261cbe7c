"""The worker process: one engine backend on one `WorkerService.Connect` stream.

    astraea-worker --control-plane 127.0.0.1:50051 --backend sim --profile gptj-6b-a100

It registers with what `backend.describe()` says, then concurrently carries out the control
plane's plans (`backend.apply`) and forwards what the backend reports. One task writes the
stream; it batches whatever is queued at the moment (tokens of several jobs into one
TokenBatch, step timings into one StepReport, only the newest MemoryReport) while keeping each
job's tokens ahead of its SegmentEnded/Preempted, and sends them as one Bundle message when the
control plane reads bundles (each gRPC message costs it more than what the message carries).

A stream that fails (the control plane died or restarted, dropped this worker as silent, sent
a message over the size limit) is retried with exponential backoff and jitter, and the worker
registers again. It exits on the control plane's `Shutdown` (a graceful stop), an engine
failure, a registration refused for good, or `reconnect_timeout_s` without one.

SIGTERM or SIGINT (a scale-down, a rolling update, `astraea up` stopping) starts a drain: the
worker sends `Drain`, the control plane places nothing new on it, moves the jobs whose KV waits
there elsewhere and answers `Shutdown(drain)`; the worker finishes its running segments, then
exits 0. After `--drain-timeout`, or on a second signal, it stops at once: the control plane
queues the segments cut short again, on another worker.

A plan action the engine refuses (`BackendError`) is logged and skipped. A refused Admit
would leave the job "running" in the control plane forever, so the worker frees the job's KV
(`backend.release`, which keeps its history) and reports `AdmitRefused`: the control plane
queues the job again, with its prompt, or fails it when the refusal is not retryable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import signal
import socket
import time

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Tracer

from astraea import wire
from astraea.auth import ClientCredentials, client_credentials_from_args
from astraea.plan import Admit
from astraea.telemetry import (
    get_logger,
    prometheus,
    setup_service_telemetry,
)
from astraea.v1 import worker_pb2
from worker.admission_spans import ADMISSION_SPAN, AdmissionSpans  # noqa: F401 (re-exported)
from worker.backend import Backend, BackendError, BackendFailed, MemoryChanged
from worker.messages import AdmitRefused, bundled, segment_input, to_messages
from worker.options import (  # noqa: F401 (the defaults are re-exported)
    DRAIN_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    MAX_MESSAGE_BYTES,
    build_parser,
    make_backend,
)

log = get_logger("astraea.worker")

EXIT_OK, EXIT_FAILED = 0, 1
# Reconnection: the first retry after ~0.5 s, doubling up to 10 s, each delay scaled by a
# random factor in [0.5, 1] so that workers lost together do not all come back at once.
RECONNECT_INITIAL_S, RECONNECT_MAX_S = 0.5, 10.0
CONNECT = "/astraea.v1.WorkerService/Connect"
# A control plane that refuses the registration itself with one of these will refuse it again:
# retrying cannot help.
_REFUSED_FOR_GOOD = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.UNIMPLEMENTED)


_HEARTBEAT = object()  # queued by the heartbeat task; sent only if nothing else is
_DRAIN = object()  # queued by start_drain: the stream's Drain message


class _Failed:
    """Queued by the forwarder when the backend dies."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _StreamLost(Exception):
    """The stream ended without a Shutdown: the worker reconnects."""


class WorkerProcess:
    def __init__(self, backend: Backend, name: str, tracer: Tracer | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 reconnect_timeout_s: float = 0.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 credentials: ClientCredentials | None = None) -> None:
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        if reconnect_timeout_s < 0:
            raise ValueError(f"reconnect_timeout_s must be >= 0, got {reconnect_timeout_s}")
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        self.backend = backend
        self.name = name
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s  # 0: keep trying for ever
        self.max_message_bytes = max_message_bytes
        # The control plane's worker token and TLS (default: plaintext, no token).
        self.credentials = credentials or ClientCredentials()
        self.channel_options = [("grpc.max_receive_message_length", 2 * max_message_bytes),
                                ("grpc.max_send_message_length", max_message_bytes)]
        self.registrations = 0  # streams the control plane accepted, over the process's life
        self._jobs: set[str] = set()  # jobs admitted on the current stream and not aborted
        self._last_write = 0.0
        self.tracer = tracer or trace.get_tracer("astraea.worker")
        self._spans = AdmissionSpans(self.tracer)
        self.worker_id = -1
        self._out: asyncio.Queue = asyncio.Queue()  # backend events, and _Failed
        self._applied_seq = 0  # Plan.seq of the last plan applied in full
        self._shutdown: worker_pb2.Shutdown | None = None
        self._write_ended = False  # this stream refused a write: it has ended
        self.draining: str | None = None  # why, once start_drain was called
        self._drain_started = 0.0
        self._drain_wakeup = asyncio.Event()  # cuts a reconnection backoff short
        self._stream_up = False  # registered on the current stream
        self._bundle_bytes = 0  # largest Bundle the control plane reads (0: none)
        self._leave = asyncio.Event()  # Shutdown(drain) received: leave once nothing runs

    def start_drain(self, reason: str, timeout_s: float | None = None) -> bool:
        """Stop gracefully: ask the control plane to place nothing new here, finish what
        runs, then exit 0. False if a drain has started already. `timeout_s` is only logged
        (the caller enforces it)."""
        if self.draining is not None:
            return False
        self.draining = reason
        self._drain_started = time.monotonic()
        log.info("draining", reason=reason, running_segments=self.backend.view().running_seqs,
                 jobs_held=len(self._jobs), connected=self._stream_up, timeout_s=timeout_s)
        if self._stream_up:
            self._out.put_nowait(_DRAIN)
        self._drain_wakeup.set()
        return True

    async def run(self, address: str) -> int:
        try:
            await self.backend.start()
        except BackendFailed as e:
            log.error("backend failed to start", error=str(e))
            return EXIT_FAILED
        # One forwarder for the process's life: the backend's events have one consumer.
        forward = asyncio.create_task(self._forward(), name="forward")
        try:
            return await self._connect_loop(address)
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await forward
            self._spans.end_all("worker stopped")
            await self.backend.stop()

    async def _connect_loop(self, address: str) -> int:
        """Sessions on fresh channels until one ends for good; between them a backoff."""
        loop = asyncio.get_running_loop()
        attempt = 0
        lost_since: float | None = None
        while True:
            if self.draining is not None:  # between streams: nothing runs here
                log.info("drained", connected=False)
                return EXIT_OK
            before = self.registrations
            try:
                async with self.credentials.aio_channel(address,
                                                        options=self.channel_options) as channel:
                    return await self._session(functools.partial(channel.stream_stream(
                        CONNECT, request_serializer=worker_pb2.WorkerMessage.SerializeToString,
                        response_deserializer=self._parse),
                        metadata=self.credentials.metadata or None))
            except grpc.aio.AioRpcError as e:
                if self.registrations == before and e.code() in _REFUSED_FOR_GOOD:
                    log.error("control plane refused the registration", code=e.code().name,
                              details=e.details())
                    return EXIT_FAILED
                why = f"{e.code().name}: {e.details()}"
            except _StreamLost as e:
                why = str(e)
            if self.draining is not None:  # not back to a control plane while leaving
                log.warning("control plane lost while draining, stopping", error=why)
                return EXIT_OK if await self._drop_engine_state() else EXIT_FAILED
            now = loop.time()
            if self.registrations != before:  # that stream was up: a new outage starts
                attempt, lost_since = 0, now
            elif lost_since is None:
                lost_since = now
            if self.reconnect_timeout_s and now - lost_since >= self.reconnect_timeout_s:
                log.error("no control plane, giving up", address=address, error=why,
                          reconnect_timeout_s=self.reconnect_timeout_s)
                return EXIT_FAILED
            delay = min(RECONNECT_MAX_S, RECONNECT_INITIAL_S * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)
            attempt += 1
            log.warning("control plane lost, reconnecting", address=address, error=why,
                        attempt=attempt, retry_in_s=round(delay, 2))
            # At once, not at the next registration: the engine stops spending on those jobs.
            if not await self._drop_engine_state():
                return EXIT_FAILED
            with contextlib.suppress(TimeoutError):  # a drain ends the wait
                await asyncio.wait_for(self._drain_wakeup.wait(), delay)

    async def _drop_engine_state(self) -> bool:
        """When a stream is lost: abort every job it admitted. Whoever answers next (a
        restarted control plane, or the same one, which ran `worker_lost` and re-queued our
        jobs) takes this worker as new and empty; KV kept for those jobs could never be used
        and would only shrink the free pool it is told about. False if the engine failed."""
        try:
            for job_id in sorted(self._jobs):
                self._spans.end(job_id, "control plane lost", error=True)
                with contextlib.suppress(BackendError):  # not held: nothing to free
                    await self.backend.apply(wire.Abort(job_id, self.worker_id, "lost"))
        except BackendFailed as e:
            log.error("backend failed", error=str(e))
            return False
        if self._jobs:
            log.info("dropped the engine state of the lost stream", jobs=len(self._jobs))
        self._jobs = set()
        await asyncio.sleep(0.05)  # let the forwarder pass on what the engine had reported
        return self._discard_queued()

    def _discard_queued(self) -> bool:
        """Drop the reports not sent on the lost stream: they are about jobs, plans and
        memory a new registration knows nothing of. False if the engine failed meanwhile."""
        failed = False
        while not self._out.empty():
            failed = isinstance(self._out.get_nowait(), _Failed) or failed
        if failed:
            log.error("backend failed while the control plane was away")
        return not failed

    def _parse(self, data: bytes) -> worker_pb2.ControlMessage | _StreamLost:
        """A control message off the wire; what cannot be one comes back as the reason the
        stream ends (gRPC would log a deserializer's exception with a traceback)."""
        if len(data) > self.max_message_bytes:
            return _StreamLost(f"a control message of {len(data)} bytes is over the limit of "
                               f"{self.max_message_bytes}")
        try:
            return worker_pb2.ControlMessage.FromString(data)
        except DecodeError as e:
            return _StreamLost(f"a control message that does not parse: {e}")

    async def _session(self, connect) -> int:
        """One stream: `connect()` opens it (the Connect method's multi-callable)."""
        call = connect()
        try:
            return await self._run_stream(call)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError, _StreamLost) as e:
            if self._shutdown is not None:  # told to leave: how the stream ends is moot
                return EXIT_OK
            if isinstance(e, asyncio.InvalidStateError):
                # A write after the stream ended, before the reader saw the end: its status.
                raise _StreamLost(f"{(await call.code()).name}: {await call.details()}") from None
            raise

    async def _run_stream(self, call) -> int:
        if self.registrations and not self._discard_queued():  # late reports of the lost one
            call.cancel()
            return EXIT_FAILED
        info = self.backend.describe()
        await call.write(worker_pb2.WorkerMessage(
            register=wire.worker_info_to_proto(info, self.name)))
        first = await call.read()
        if isinstance(first, _StreamLost):
            raise first
        if first is grpc.aio.EOF:
            raise _StreamLost("control plane closed the stream before answering register")
        if first.WhichOneof("msg") != "registered":  # not a control plane we can work with
            log.error("control plane did not answer register", got=str(first))
            call.cancel()
            return EXIT_FAILED
        self.worker_id = first.registered.worker_id
        self._bundle_bytes = min(first.registered.bundle_max_bytes, self.max_message_bytes)
        self.registrations += 1
        self._applied_seq, self._shutdown, self._write_ended = 0, None, False
        self._leave = asyncio.Event()
        log.info("registered", worker_id=self.worker_id, worker_name=self.name,
                 registration=self.registrations)
        # The memory as it is now, first: the registration says only what the engine holds.
        self._out.put_nowait(MemoryChanged(self.backend.view()))
        self._stream_up = True
        if self.draining is not None:  # a signal came while registering
            self._out.put_nowait(_DRAIN)
        tasks = [asyncio.create_task(self._receive(call), name="receive"),
                 asyncio.create_task(self._send(call), name="send"),
                 asyncio.create_task(self._heartbeat(), name="heartbeat"),
                 asyncio.create_task(self._leave_when_idle(call), name="leave")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
                code = t.result()
                if code is not None:
                    return code
            return EXIT_OK
        finally:
            self._stream_up = False
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            call.cancel()  # a no-op after a clean end; else the control plane sees us go

    async def _receive(self, call) -> int:
        """Carry out plans until the control plane shuts us down or closes the stream."""
        while True:
            msg = await call.read()
            if isinstance(msg, _StreamLost):
                raise msg
            if msg is grpc.aio.EOF:
                if self._shutdown is None:
                    raise _StreamLost("control plane closed the stream without a shutdown")
                if self._shutdown.drain:  # closed after asking for a drain: still finish
                    await self._until_idle()
                return EXIT_OK
            kind = msg.WhichOneof("msg")
            if kind == "plan":
                for pa in msg.plan.actions:
                    await self._apply(pa)
                self._applied_seq = msg.plan.seq
            elif kind == "shutdown":
                self._shutdown = msg.shutdown
                log.info("shutdown requested", reason=msg.shutdown.reason,
                         drain=msg.shutdown.drain)
                if msg.shutdown.drain:
                    # _leave_when_idle ends the stream; until then plans still come (a Pause
                    # for a segment that ended, an Abort for a job cancelled or moved off).
                    self._leave.set()
                    continue
                await self._flush()
                await call.done_writing()
                return EXIT_OK
            else:
                log.warning("unexpected control message ignored", kind=kind)

    async def _until_idle(self) -> None:
        while self.backend.view().running_seqs:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # let the last reports reach the sender

    async def _leave_when_idle(self, call) -> int:
        """After a Shutdown(drain): once no segment runs, send what is queued and close the
        stream: the control plane takes that as the end of the drain."""
        await self._leave.wait()
        await self._until_idle()
        await self._flush()
        await call.done_writing()
        if self.draining is not None:
            log.info("drained", seconds=round(time.monotonic() - self._drain_started, 2))
        else:
            log.info("drained", reason=self._shutdown.reason if self._shutdown else "")
        return EXIT_OK

    async def _apply(self, pa: worker_pb2.PlanAction) -> None:
        try:
            action = wire.plan_action_from_proto(pa, self.worker_id)
        except ValueError as e:
            log.warning("bad plan action ignored", error=str(e))
            return
        segment = None
        if isinstance(action, Admit):
            self._jobs.add(action.job_id)
            segment = segment_input(pa.admit)
            self._spans.start(action, segment, pa.admit.trace_context, self.worker_id)
        elif isinstance(action, wire.Abort):
            self._jobs.discard(action.job_id)
            self._spans.end(action.job_id, f"aborted: {action.reason}")
        try:
            await self.backend.apply(action, segment)
        except BackendError as e:
            log.warning("plan action refused", action=type(action).__name__,
                        job_id=action.job_id, error=str(e))
            if isinstance(action, Admit):
                self._spans.end(action.job_id, f"admit refused: {e}", error=True)
                await self.backend.release(action.job_id)
                self._out.put_nowait(AdmitRefused(action.job_id, str(e), e.retryable))

    async def _forward(self) -> None:
        try:
            async for ev in self.backend.events():
                self._spans.on_event(ev)
                self._out.put_nowait(ev)
        except BackendFailed as e:
            self._out.put_nowait(_Failed(e))
        # events() ended: the backend stopped; the other tasks decide how we exit.
        await asyncio.Event().wait()

    async def _send(self, call) -> int:
        while True:
            items = [await self._out.get()]
            while not self._out.empty():
                items.append(self._out.get_nowait())
            failed = next((i for i in items if isinstance(i, _Failed)), None)
            events = [i for i in items if not isinstance(i, _Failed)]
            # The memory figures are taken now, with the plan they follow, both at one instant
            # of the event loop: the control plane can tell which of its plans they include.
            memory = None
            if any(isinstance(e, MemoryChanged) for e in events):
                memory = wire.worker_view_to_proto(self.backend.view())
                memory.applied_plan_seq = self._applied_seq
            msgs = to_messages([e for e in events if e is not _HEARTBEAT and e is not _DRAIN],
                               self.worker_id, memory)
            if _DRAIN in events:  # after the reports queued with it
                msgs.append(worker_pb2.WorkerMessage(drain=worker_pb2.Drain(
                    reason=self.draining or "", running_segments=self.backend.view().running_seqs)))
            if not msgs and _HEARTBEAT in events:
                msgs = [worker_pb2.WorkerMessage(
                    heartbeat=worker_pb2.Heartbeat(sent_unix_s=time.time()))]
            if self._bundle_bytes:
                msgs = bundled(msgs, self._bundle_bytes)
            try:
                for msg in msgs:
                    await call.write(msg)
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                if failed is None:  # the stream has ended: the reader learns how, and ends us
                    self._write_ended = True
                    await asyncio.Event().wait()
            self._last_write = asyncio.get_running_loop().time()
            if failed is not None:
                # No message carries an error: closing the stream with a cancel makes the
                # control plane drop this worker and re-queue its jobs.
                log.error("backend failed; leaving", error=str(failed.exc))
                call.cancel()
                return EXIT_FAILED

    async def _heartbeat(self) -> None:
        """While nothing else is sent, one Heartbeat per interval: the control plane drops a
        worker it has not heard from for its --worker-timeout (a hung process, a lost host)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            if loop.time() - self._last_write >= self.heartbeat_interval_s:
                self._out.put_nowait(_HEARTBEAT)

    async def _flush(self) -> None:
        """Wait until the sender has written everything queued so far (or cannot)."""
        while not self._out.empty() and not self._write_ended:
            await asyncio.sleep(0.01)


async def run_worker(control_plane_address: str, backend: Backend, name: str,
                     tracer: Tracer | None = None,
                     heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                     reconnect_timeout_s: float = 0.0,
                     max_message_bytes: int = MAX_MESSAGE_BYTES,
                     credentials: ClientCredentials | None = None) -> int:
    """Run a worker until the control plane shuts it down (0) or something fails (1); a lost
    control plane is reconnected to (for at most `reconnect_timeout_s`; 0: for ever)."""
    return await WorkerProcess(backend, name, tracer, heartbeat_interval_s, reconnect_timeout_s,
                               max_message_bytes, credentials).run(control_plane_address)


async def _main_async(args: argparse.Namespace) -> int:
    backend = prometheus.metered_backend(make_backend(args))  # /metrics, when served
    name = args.name or f"{socket.gethostname()}:{args.backend}"
    worker = WorkerProcess(backend, name, heartbeat_interval_s=args.heartbeat_interval,
                           reconnect_timeout_s=args.reconnect_timeout,
                           max_message_bytes=args.max_message_bytes,
                           credentials=getattr(args, "credentials", None))
    task = asyncio.create_task(worker.run(args.control_plane))
    loop = asyncio.get_running_loop()
    timeout = args.drain_timeout

    def drain_expired() -> None:
        if not task.done():
            # Cancelling closes the stream: the control plane queues what still runs again.
            log.warning("drain timed out, stopping now", timeout_s=timeout,
                        running_segments=worker.backend.view().running_seqs)
            task.cancel()

    def on_signal(sig: signal.Signals) -> None:
        if task.done():
            return
        if timeout > 0 and worker.start_drain(f"{sig.name} received", timeout):
            loop.call_later(timeout, drain_expired)
        else:  # a second signal, or draining turned off
            log.warning("stopping now", signal=sig.name)
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await task
    except asyncio.CancelledError:
        log.info("stopped by signal")
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.heartbeat_interval > 0:
        parser.error("--heartbeat-interval must be positive")
    if not args.reconnect_timeout >= 0:
        parser.error("--reconnect-timeout must be >= 0")
    if not args.drain_timeout >= 0:
        parser.error("--drain-timeout must be >= 0")
    if args.max_message_bytes < 1024:
        parser.error("--max-message-bytes must be at least 1024")
    try:
        args.credentials = client_credentials_from_args(args, "--token-file")
    except ValueError as e:
        parser.error(str(e))
    # structlog JSON lines on stderr, with the current trace's ids.
    tel = setup_service_telemetry(parser, "astraea-worker", args.log_level, args)
    try:
        code = asyncio.run(_main_async(args))
    except (ValueError, OSError) as e:
        log.error("cannot start", error=str(e))
        return 2
    finally:
        tel.shutdown()
    if code != EXIT_OK:
        log.error("exiting with an error (see the log above)", exit_code=code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
