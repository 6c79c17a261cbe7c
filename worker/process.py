"""The worker process: one engine backend on one `WorkerService.Connect` stream.

    astraea-worker --control-plane 127.0.0.1:50051 --backend sim --profile gptj-6b-a100

It registers with what `backend.describe()` says, then concurrently carries out the control
plane's plans (`backend.apply`) and forwards what the backend reports. One task writes the
stream; it batches whatever is queued at the moment (tokens of several jobs into one
TokenBatch, step timings into one StepReport, only the newest MemoryReport) while keeping each
job's tokens ahead of its SegmentEnded/Preempted.

A plan action the engine refuses (`BackendError`) is logged and skipped. A refused Admit
would leave the job "running" in the control plane forever, so the worker frees the job's KV
(`backend.release`, which keeps its history) and reports `AdmitRefused`: the control plane
queues the job again, with its prompt, or fails it when the refusal is not retryable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import time
from dataclasses import dataclass

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from astraea import wire
from astraea.plan import Admit
from astraea.telemetry import add_log_level_argument, get_logger, setup_service_telemetry, spans
from astraea.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.backend import (
    Backend,
    BackendError,
    BackendFailed,
    MemoryChanged,
    Sampling,
    SegmentEnded,
    SegmentInput,
    SegmentPreempted,
    StepTiming,
    TokensGenerated,
)

log = get_logger("astraea.worker")

EXIT_OK, EXIT_FAILED = 0, 1
HEARTBEAT_INTERVAL_S = 1.0  # well under the control plane's default --worker-timeout (10 s)

# The worker's span of one admission of a segment: Admit applied → segment ended, preempted
# or aborted. A child of the control plane's ``segment`` span (Admit.trace_context).
ADMISSION_SPAN = "admission"
PREFILL_TOKENS, MAX_TOKENS = "astraea.prefill_tokens", "astraea.max_tokens"
SWAP_IN = "astraea.swap_in"
END_REASON = "astraea.end_reason"


_HEARTBEAT = object()  # queued by the heartbeat task; sent only if nothing else is


class _Failed:
    """Queued by the forwarder when the backend dies."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# A backend's own finish reason; None (a length-ended segment) leaves it UNSPECIFIED, and the
# control plane decides TOOL_CALL or LENGTH from the client's next_tool_category hint.
_FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP,
                   "length": common_pb2.FINISH_REASON_LENGTH,
                   "tool_call": common_pb2.FINISH_REASON_TOOL_CALL}


@dataclass(frozen=True)
class AdmitRefused:
    """Queued by the worker itself (not a backend event) when the backend refused an Admit;
    it goes out in order with the job's backend events."""

    job_id: str
    reason: str
    retryable: bool


def _segment_input(a: worker_pb2.Admit) -> SegmentInput:
    # The Admit carries what is left of the segment's budget (`max_tokens`) and the whole
    # budget (`sampling.max_tokens`); their difference is where this admission starts.
    budget = a.sampling.max_tokens if a.sampling.HasField("max_tokens") else 0
    max_tokens = a.max_tokens or budget
    ids = tuple(a.prompt_token_ids.ids) if a.WhichOneof("prompt") == "prompt_token_ids" else None
    text = a.prompt_text if a.WhichOneof("prompt") == "prompt_text" else None
    context = tuple(p.text if p.WhichOneof("piece") == "text" else tuple(p.token_ids.ids)
                    for p in a.context) or None
    return SegmentInput(max_tokens=max_tokens, first_index=max(budget - max_tokens, 0),
                        prompt_token_ids=ids, prompt_text=text, context=context,
                        sampling=_sampling(a.sampling))


def _sampling(p: common_pb2.SamplingParams) -> Sampling:
    # The control plane fills temperature and top_p in; a field still unset (a worker driven
    # without it) keeps the greedy default of `Sampling`.
    return Sampling(temperature=p.temperature if p.HasField("temperature") else 0.0,
                    top_p=p.top_p if p.HasField("top_p") else 1.0,
                    seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
                    json_schema=p.json_schema or None)


def _to_messages(items: list, worker_id: int,
                 memory: worker_pb2.MemoryReport | None = None) -> list[worker_pb2.WorkerMessage]:
    """Backend events (in order) as stream messages, batched. `memory`, if given, replaces
    the MemoryChanged views and goes first: it is the memory as of now (after every event of
    the batch), so the KV decisions the control plane takes on the segment ends that follow
    see it rather than the previous report."""
    out: list[worker_pb2.WorkerMessage] = []
    if memory is not None and any(isinstance(e, MemoryChanged) for e in items):
        out.append(worker_pb2.WorkerMessage(memory=memory))
    tokens: dict[str, worker_pb2.JobTokens] = {}
    steps: list[common_pb2.StepTiming] = []
    last_memory = max((i for i, e in enumerate(items) if isinstance(e, MemoryChanged)), default=-1)

    def flush_tokens() -> None:
        if tokens:
            out.append(worker_pb2.WorkerMessage(
                tokens=worker_pb2.TokenBatch(jobs=list(tokens.values()))))
            tokens.clear()

    for i, ev in enumerate(items):
        if isinstance(ev, TokensGenerated):
            jt = tokens.get(ev.job_id)
            if jt is not None and jt.first_index + len(jt.token_ids) != ev.first_index:
                flush_tokens()
                jt = None
            if jt is None:
                tokens[ev.job_id] = worker_pb2.JobTokens(
                    job_id=ev.job_id, first_index=ev.first_index, token_ids=ev.token_ids,
                    text=ev.text)
            else:
                jt.token_ids.extend(ev.token_ids)
                jt.text += ev.text
        elif isinstance(ev, StepTiming):
            steps.append(common_pb2.StepTiming(tokens=ev.tokens,
                                               context_tokens_read=ev.context_tokens_read,
                                               duration_s=ev.duration_s))
        elif isinstance(ev, MemoryChanged):
            if i == last_memory and memory is None:
                flush_tokens()
                out.append(worker_pb2.WorkerMessage(memory=wire.worker_view_to_proto(ev.view)))
        elif isinstance(ev, SegmentEnded):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(segment_ended=worker_pb2.SegmentEnded(
                job_id=ev.job_id, generated_tokens=ev.generated_tokens,
                prefill_tokens=ev.prefill_tokens, ttft_s=ev.ttft_s, duration_s=ev.duration_s,
                finish_reason=_FINISH_REASONS.get(ev.finish_reason,
                                                  common_pb2.FINISH_REASON_UNSPECIFIED))))
        elif isinstance(ev, SegmentPreempted):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(preempted=worker_pb2.Preempted(
                job_id=ev.job_id, generated_tokens=ev.generated_tokens,
                action=wire.kv_action_to_proto(ev.action))))
        elif isinstance(ev, AdmitRefused):
            flush_tokens()
            out.append(worker_pb2.WorkerMessage(admit_refused=worker_pb2.AdmitRefused(
                job_id=ev.job_id, reason=ev.reason, retryable=ev.retryable)))
    flush_tokens()
    if steps:
        out.append(worker_pb2.WorkerMessage(step_report=worker_pb2.StepReport(steps=steps)))
    return out


class WorkerProcess:
    def __init__(self, backend: Backend, name: str, tracer: Tracer | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        self.backend = backend
        self.name = name
        self.heartbeat_interval_s = heartbeat_interval_s
        self._last_write = 0.0
        self.tracer = tracer or trace.get_tracer("astraea.worker")
        self._spans: dict[str, Span] = {}  # job id → its open admission span
        self.worker_id = -1
        self._out: asyncio.Queue = asyncio.Queue()  # backend events, and _Failed
        self._applied_seq = 0  # Plan.seq of the last plan applied in full
        self._shutdown: worker_pb2.Shutdown | None = None

    async def run(self, address: str) -> int:
        try:
            await self.backend.start()
        except BackendFailed as e:
            log.error("backend failed to start", error=str(e))
            return EXIT_FAILED
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                return await self._session(worker_pb2_grpc.WorkerServiceStub(channel))
        except grpc.aio.AioRpcError as e:
            log.error("control plane stream failed", code=e.code().name, details=e.details())
            return EXIT_FAILED
        finally:
            await self.backend.stop()

    async def _session(self, stub: worker_pb2_grpc.WorkerServiceStub) -> int:
        info = self.backend.describe()
        call = stub.Connect()
        await call.write(worker_pb2.WorkerMessage(
            register=wire.worker_info_to_proto(info, self.name)))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "registered":
            log.error("control plane did not answer register", got=str(first))
            call.cancel()
            return EXIT_FAILED
        self.worker_id = first.registered.worker_id
        log.info("registered", worker_id=self.worker_id, worker_name=self.name)
        tasks = [asyncio.create_task(self._receive(call), name="receive"),
                 asyncio.create_task(self._forward(), name="forward"),
                 asyncio.create_task(self._send(call), name="send"),
                 asyncio.create_task(self._heartbeat(), name="heartbeat")]
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
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for job_id in list(self._spans):
                self._end_span(job_id, "worker stopped", error=True)

    async def _receive(self, call) -> int:
        """Carry out plans until the control plane shuts us down or closes the stream."""
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                if self._shutdown is None:
                    log.error("control plane closed the stream")
                    return EXIT_FAILED
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
                    while self.backend.view().running_seqs:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0)  # let the last reports reach the sender
                await self._flush()
                await call.done_writing()
                return EXIT_OK
            else:
                log.warning("unexpected control message ignored", kind=kind)

    async def _apply(self, pa: worker_pb2.PlanAction) -> None:
        try:
            action = wire.plan_action_from_proto(pa, self.worker_id)
        except ValueError as e:
            log.warning("bad plan action ignored", error=str(e))
            return
        segment = None
        if isinstance(action, Admit):
            segment = _segment_input(pa.admit)
            self._start_span(action, segment, pa.admit.trace_context)
        elif isinstance(action, wire.Abort):
            self._end_span(action.job_id, f"aborted: {action.reason}")
        try:
            await self.backend.apply(action, segment)
        except BackendError as e:
            log.warning("plan action refused", action=type(action).__name__,
                        job_id=action.job_id, error=str(e))
            if isinstance(action, Admit):
                self._end_span(action.job_id, f"admit refused: {e}", error=True)
                await self.backend.release(action.job_id)
                self._out.put_nowait(AdmitRefused(action.job_id, str(e), e.retryable))

    # --- admission spans -----------------------------------------------------------------
    def _start_span(self, action: Admit, segment: SegmentInput, trace_context) -> None:
        self._end_span(action.job_id, "admitted again")  # never leak one
        parent = propagate.extract(dict(trace_context)) if trace_context else None
        self._spans[action.job_id] = self.tracer.start_span(
            ADMISSION_SPAN, context=parent, attributes={
                spans.JOB_ID: action.job_id, spans.WORKER_ID: self.worker_id,
                SWAP_IN: action.swap_in, MAX_TOKENS: segment.max_tokens,
                "astraea.new_tokens": action.new_tokens,
                "astraea.context_tokens": action.context_tokens})

    def _end_span(self, job_id: str, reason: str, error: bool = False, **attrs) -> None:
        span = self._spans.pop(job_id, None)
        if span is None:
            return
        span.set_attributes({END_REASON: reason, **attrs})
        if error:
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def _event_ends_span(self, ev) -> None:
        if isinstance(ev, SegmentEnded):
            self._end_span(ev.job_id, "segment ended", **{
                spans.TOKENS: ev.generated_tokens, PREFILL_TOKENS: ev.prefill_tokens,
                spans.TTFT_S: ev.ttft_s})
        elif isinstance(ev, SegmentPreempted):
            self._end_span(ev.job_id, "preempted", **{
                spans.TOKENS: ev.generated_tokens, spans.KV_ACTION: ev.action.value})

    async def _forward(self) -> None:
        try:
            async for ev in self.backend.events():
                if isinstance(ev, SegmentEnded | SegmentPreempted):
                    self._event_ends_span(ev)
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
            msgs = _to_messages([e for e in events if e is not _HEARTBEAT], self.worker_id,
                                memory)
            if not msgs and _HEARTBEAT in events:
                msgs = [worker_pb2.WorkerMessage(
                    heartbeat=worker_pb2.Heartbeat(sent_unix_s=time.time()))]
            for msg in msgs:
                await call.write(msg)
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
        """Wait until the sender has written everything queued so far."""
        while not self._out.empty():
            await asyncio.sleep(0.01)


async def run_worker(control_plane_address: str, backend: Backend, name: str,
                     tracer: Tracer | None = None,
                     heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> int:
    """Run a worker until the control plane shuts it down (0) or something fails (1)."""
    return await WorkerProcess(backend, name, tracer, heartbeat_interval_s).run(
        control_plane_address)


def _make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "vllm":
        # Imported only here: the simulated worker needs no vLLM.
        from worker.vllm.backend import VllmBackend
        from worker.vllm.engine import EngineConfig
        from worker.vllm.tiny_model import resolve_model

        return VllmBackend(EngineConfig(
            model=resolve_model(args.model),
            # The pool includes vLLM's null block: one more than the usable blocks asked for.
            num_blocks=None if args.kv_blocks is None else args.kv_blocks + 1,
            max_model_len=args.max_model_len, dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization,
            host_swap_blocks=args.host_swap_blocks))
    from astraea.profile import load_profile
    from worker.sim.backend import SimulatedBackend

    if args.backend != "sim":
        raise ValueError(f"unknown backend {args.backend!r}")
    return SimulatedBackend(load_profile(args.profile), time_scale=args.time_scale,
                            kv_blocks=args.kv_blocks)


async def _main_async(args: argparse.Namespace) -> int:
    backend = _make_backend(args)
    name = args.name or f"{socket.gethostname()}:{args.backend}"
    task = asyncio.create_task(run_worker(args.control_plane, backend, name,
                                          heartbeat_interval_s=args.heartbeat_interval))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        log.info("stopped by signal")
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The command line of `astraea-worker` (tests check docker/compose.yaml against it)."""
    parser = argparse.ArgumentParser(prog="astraea-worker", description="Astraea worker")
    parser.add_argument("--control-plane", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--backend", default="sim", choices=["sim", "vllm"])
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="vllm: a local Hugging Face model folder, or a model the project "
                             "builds on first use: tiny (default) or small")
    parser.add_argument("--profile", default="gptj-6b-a100")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="wall seconds per engine second (< 1 runs faster than real time)")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="GPU KV blocks (sim default: from the profile; vllm: the usable "
                             "blocks of vLLM's pool, default: sized by vLLM from memory)")
    vllm = parser.add_argument_group("vllm backend")
    vllm.add_argument("--dtype", default="auto",
                      help="weights and activations (vLLM's: auto = the model's own)")
    vllm.add_argument("--max-model-len", type=int, default=None,
                      help="context window (default: the model's, or what --kv-blocks holds)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                      help="share of the GPU for weights and KV cache (vLLM's)")
    vllm.add_argument("--host-swap-blocks", type=int, default=256,
                      help="host memory for swapped-out KV, in blocks")
    parser.add_argument("--name", default=None, help="default: <hostname>:<backend>")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S,
                        metavar="SECONDS",
                        help="send a heartbeat when nothing else was sent for this long; keep "
                             "it well under the control plane's --worker-timeout")
    add_log_level_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.heartbeat_interval > 0:
        parser.error("--heartbeat-interval must be positive")
    # structlog JSON lines on stderr, with the current trace's ids.
    tel = setup_service_telemetry(parser, "astraea-worker", args.log_level)
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
