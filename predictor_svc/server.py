"""The predictor service: `astraea.v1.PredictorService` over gRPC.

It serves batched service-time estimates to the control plane and learns from the
observations the control plane forwards: API durations per tool category and output lengths
(`astraea.estimators.OnlineEstimator`), and engine step timings (`step_time.StepTimeModel`, seeded
from a hardware profile). Its state lives in one file on its host, named on its command line
(`--state`): SaveState/LoadState act on that file and take no path from the network.

Requests are untrusted. A request with any bad element is rejected whole with
INVALID_ARGUMENT naming the field and index, and nothing from it is applied: the whole batch is
validated before any of it is learned; every bound is in limits.py, and a burst of API
observations moves a category's estimate by a bounded factor (`limits.BurstClip`). Unknown
categories are fine: they borrow the pooled estimates, then the prior. Handlers run on a
thread pool; one lock guards the learned state.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from astraea.auth import (
    AuthInterceptor,
    AuthPolicy,
    KeyRing,
    ServerTLS,
    add_port,
    add_server_arguments,
    open_warning,
    server_tls_from_args,
)
from astraea.errors import InvalidRequest
from astraea.estimators import OnlineEstimator
from astraea.profile import HardwareProfile, ProfileError, load_profile
from astraea.rpc_guard import RequestGuard
from astraea.telemetry import (
    add_log_level_argument,
    extract_context,
    prometheus,
    setup_service_telemetry,
)
from astraea.v1 import predictor_pb2, predictor_pb2_grpc
from predictor_svc import limits as limits_mod
from predictor_svc.limits import BurstClip, PredictorLimits
from predictor_svc.state import (
    SAVE_INTERVAL_S,
    PeriodicSaver,
    PredictorState,
    StateError,
    load_state,
    save_state,
)
from predictor_svc.step_time import StepTimeModel

log = logging.getLogger("astraea.predictor")

MAX_BATCH = PredictorLimits.max_batch
DEFAULT_LIMITS = PredictorLimits()
DEFAULT_LISTEN = "127.0.0.1:50071"
DEFAULT_PROFILE = "gptj-6b-a100"
SHUTDOWN_GRACE_S = 5.0


def _finite_nonneg(value: float, where: str, most: float = math.inf) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"{where} is {value}: must be a finite number")
    if value < 0:
        raise InvalidRequest(f"{where} is {value}: must be >= 0")
    if value > most:
        raise InvalidRequest(f"{where} is {value}: at most {most:g}")


def _batch_size(n: int, what: str, lim: PredictorLimits) -> None:
    if n == 0:
        raise InvalidRequest(f"{what} is empty: send at least one element")
    if n > lim.max_batch:
        raise InvalidRequest(f"{what} has {n} elements: at most {lim.max_batch} per request")


def _id(value: str, where: str, lim: PredictorLimits, empty_ok: bool = False) -> None:
    if not value and not empty_ok:
        raise InvalidRequest(f"{where} is empty")
    if len(value) > lim.max_id_chars:
        raise InvalidRequest(f"{where} has {len(value)} characters: at most {lim.max_id_chars}")


def validate_estimate(req: predictor_pb2.EstimateBatchRequest,
                      lim: PredictorLimits = DEFAULT_LIMITS) -> None:
    _batch_size(len(req.requests), "EstimateBatchRequest.requests", lim)
    for i, r in enumerate(req.requests):
        where = f"EstimateBatchRequest.requests[{i}]"
        _id(r.job_id, f"{where}.job_id", lim)
        # An empty category is allowed here: the job's next tool may not be known yet, and
        # the pooled estimates are then the best answer.
        _id(r.category, f"{where}.category", lim, empty_ok=True)
        _finite_nonneg(r.elapsed_api_s, f"{where}.elapsed_api_s")


def validate_observe(req: predictor_pb2.ObserveRequest,
                     lim: PredictorLimits = DEFAULT_LIMITS) -> None:
    total = len(req.api_calls) + len(req.outputs) + len(req.steps)
    _batch_size(total, "ObserveRequest (api_calls + outputs + steps)", lim)
    for i, a in enumerate(req.api_calls):
        where = f"ObserveRequest.api_calls[{i}]"
        _id(a.category, f"{where}.category", lim)
        _finite_nonneg(a.duration_s, f"{where}.duration_s", lim.max_api_duration_s)
    for i, o in enumerate(req.outputs):
        where = f"ObserveRequest.outputs[{i}]"
        _id(o.category, f"{where}.category", lim)
        if o.output_tokens > lim.max_output_tokens:
            raise InvalidRequest(f"{where}.output_tokens is {o.output_tokens}: at most "
                                 f"{lim.max_output_tokens}")
    for i, s in enumerate(req.steps):
        where = f"ObserveRequest.steps[{i}]"
        if s.tokens == 0:
            raise InvalidRequest(f"{where}.tokens is 0: a step processes at least one token")
        if s.decode_tokens > s.tokens:
            raise InvalidRequest(
                f"{where}.decode_tokens ({s.decode_tokens}) exceeds tokens ({s.tokens})")
        _finite_nonneg(s.duration_s, f"{where}.duration_s", lim.max_step_duration_s)


class Predictor:
    """The learned state and the estimate/observe logic, free of gRPC; thread-safe."""

    def __init__(self, profile: HardwareProfile, limits: PredictorLimits = DEFAULT_LIMITS,
                 clock=time.monotonic) -> None:
        self.profile = profile
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._est = OnlineEstimator()
        self._steps = StepTimeModel(profile)
        self._clip = BurstClip(limits.clip_factor, limits.clip_refresh_s, limits.clip_after)

    def estimate(self, req: predictor_pb2.EstimateBatchRequest) -> predictor_pb2.EstimateBatchResponse:
        validate_estimate(req, self.limits)
        out = predictor_pb2.EstimateBatchResponse()
        with self._lock:
            est, steps = self._est, self._steps
            steps_learned = steps.is_learned  # refits once, if observations came in
            for r in req.requests:
                cat = r.category
                tokens = est.output_tokens_for(cat, r.segment_index)
                context = r.context_tokens + r.new_tokens
                # The scheduler's T (Scheduler.predicted_compute_s): prefill the new tokens
                # over the resident history, then decode `tokens` steps at the full context.
                compute = (steps.prefill_time_s(r.new_tokens, r.context_tokens)
                           + tokens * steps.decode_step_s(context))
                learned = (steps_learned or est.api_is_learned(cat)
                           or est.output_is_learned(cat, r.segment_index))
                out.estimates.add(
                    job_id=r.job_id,
                    output_tokens=tokens,
                    compute_s=compute,
                    api_total_s=est.api_mean_s(cat),
                    api_remaining_s=est.api_remaining_s(cat, r.elapsed_api_s),
                    source=(predictor_pb2.ESTIMATE_SOURCE_MODEL if learned
                            else predictor_pb2.ESTIMATE_SOURCE_PRIOR),
                )
            out.api_observations, out.output_observations = est.observations()
        return out

    def observe(self, req: predictor_pb2.ObserveRequest) -> predictor_pb2.ObserveResponse:
        validate_observe(req, self.limits)  # all or nothing: nothing is learned from a bad batch
        now = self._clock()
        with self._lock:
            est = self._est
            for a in req.api_calls:
                est.observe_api(a.category, self._clip.clip(
                    a.category, a.duration_s, est.api_mean_s(a.category), now))
            for o in req.outputs:
                self._est.observe_output_for(o.category, o.segment_index, o.output_tokens)
            for s in req.steps:
                self._steps.observe(s.tokens, s.context_tokens_read, s.duration_s)
        return predictor_pb2.ObserveResponse(
            accepted=len(req.api_calls) + len(req.outputs) + len(req.steps))

    def snapshot(self) -> PredictorState:
        # export_state copies everything, so the file can be written outside the lock.
        with self._lock:
            est = OnlineEstimator.from_state(self._est.export_state())
            return PredictorState(est, self._steps.timings, self.profile.name)

    def save(self, path: str) -> int:
        return save_state(self.snapshot(), path)

    def load(self, path: str) -> None:
        state = load_state(path)  # validated in full before anything is replaced
        steps = StepTimeModel(self.profile, window=self._steps.window)
        steps.replace_timings(state.step_timings)
        with self._lock:
            self._est, self._steps = state.estimator, steps
            self._clip.forget()


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    """Estimate and Observe run in a server span continuing the caller's trace (the control
    plane's ``predictor.estimate`` / ``predictor.observe``)."""

    def __init__(self, predictor: Predictor, tracer: Tracer | None = None,
                 state_path: str | None = None) -> None:
        self.predictor = predictor
        self.tracer = tracer or trace.get_tracer("astraea.predictor")
        self.state_path = state_path  # the one file SaveState/LoadState act on (--state)

    def _state_file(self, request, context, rpc: str) -> str:
        """The predictor's own state file. A path from the network is refused: a caller must
        not choose which file on this host is written or read, nor learn whether one exists."""
        if request.path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{rpc}Request.path must be empty: the predictor uses only its own "
                          "state file (its --state option)")
        if not self.state_path:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{rpc}: the predictor was started without a state file (--state)")
        return self.state_path

    def Estimate(self, request, context):
        with self.tracer.start_as_current_span(
                "Estimate", context=extract_context(context), kind=SpanKind.SERVER,
                attributes={"astraea.predictor.requests": len(request.requests)}):
            try:
                return self.predictor.estimate(request)
            except InvalidRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Observe(self, request, context):
        n = len(request.api_calls) + len(request.outputs) + len(request.steps)
        with self.tracer.start_as_current_span(
                "Observe", context=extract_context(context), kind=SpanKind.SERVER,
                attributes={"astraea.predictor.observations": n}):
            try:
                return self.predictor.observe(request)
            except InvalidRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def SaveState(self, request, context):
        path = self._state_file(request, context, "SaveState")
        try:
            size = self.predictor.save(path)
        except OSError as e:
            log.error("cannot write state file %s: %s", path, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"cannot write the state file: {e.strerror or e}")
        log.info("state saved to %s (%d bytes)", path, size)
        return predictor_pb2.SaveStateResponse(size_bytes=size)

    def LoadState(self, request, context):
        path = self._state_file(request, context, "LoadState")
        try:
            self.predictor.load(path)
        except StateError as e:
            code = (grpc.StatusCode.NOT_FOUND if not os.path.exists(path)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(e))
        log.info("state loaded from %s", path)
        return predictor_pb2.LoadStateResponse()


@dataclass(frozen=True)
class RunningPredictor:
    """A predictor `serve` started: its gRPC server, the port it bound and its state."""

    server: grpc.Server
    port: int
    predictor: Predictor
    # SERVING while up, NOT_SERVING from the start of a graceful stop
    # (`health.enter_graceful_shutdown()`, as main does on SIGTERM).
    health: health.HealthServicer

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give in-flight ones `grace` seconds; the event is set when done."""
        return self.server.stop(grace)


def serve(address: str, profile_name: str, state_path: str | None = None,
          max_workers: int | None = None, tracer: Tracer | None = None,
          limits: PredictorLimits = DEFAULT_LIMITS, auth: AuthPolicy | None = None,
          tls: ServerTLS | None = None) -> RunningPredictor:
    """Start a predictor on `address` (host:port; port 0 picks a free one) and return it
    running. A `state_path` that exists is loaded first; a bad one raises `StateError`.
    SaveState/LoadState act on `state_path` only. `auth` checks callers' keys (the health
    service stays open), `tls` serves TLS."""
    predictor = Predictor(load_profile(profile_name), limits)
    if state_path and os.path.exists(state_path):
        predictor.load(state_path)
        log.info("state loaded from %s", state_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers or limits.max_workers,
                                                    thread_name_prefix="predictor"),
                         interceptors=[*prometheus.server_interceptors(),
                                       *([RequestGuard()] if auth is None
                                         else [AuthInterceptor(auth), RequestGuard()])],
                         options=limits.server_options(),
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(
        PredictorServicer(predictor, tracer, state_path), server)
    hs = health.HealthServicer()
    for name in ("", "astraea.v1.PredictorService"):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = add_port(server, address, tls)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return RunningPredictor(server, port, predictor, hs)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `astraea-predictor` (tests check docker/compose.yaml against it)."""
    parser = argparse.ArgumentParser(prog="astraea-predictor", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to serve on")
    parser.add_argument("--profile", default=DEFAULT_PROFILE,
                        help="hardware profile name or JSON path (seeds the step-time model)")
    parser.add_argument("--state", default=None, metavar="FILE",
                        help="state file: loaded at start if it exists, saved every "
                             "--save-interval seconds and on SIGTERM/SIGINT")
    parser.add_argument("--save-interval", type=float, default=SAVE_INTERVAL_S,
                        metavar="SECONDS", help="period of the state file's saves while "
                                                "serving: what a SIGKILL can lose")
    parser.add_argument("--grace", type=float, default=SHUTDOWN_GRACE_S,
                        help="seconds in-flight calls get to finish on shutdown")
    limits_mod.add_arguments(parser)
    add_server_arguments(parser).add_argument(
        "--token-file", default=None, metavar="FILE",
        help="callers (the control plane) must send one of these tokens (one per line)")
    add_log_level_argument(parser)
    prometheus.add_metrics_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.save_interval > 0:
        parser.error("--save-interval must be positive")
    # structlog JSON lines on stderr (stdlib records of this module included), with trace ids.
    tel = setup_service_telemetry(parser, "astraea-predictor", args.log_level, args)
    try:
        return _run(args)
    finally:
        tel.shutdown()


def _run(args: argparse.Namespace) -> int:
    try:
        auth = (AuthPolicy({"astraea.v1.PredictorService": KeyRing.from_file(args.token_file)})
                if args.token_file else None)
        tls = server_tls_from_args(args)
        running = serve(args.listen, args.profile, args.state,
                        limits=limits_mod.from_args(args), auth=auth, tls=tls)
    except (ProfileError, StateError, OSError, ValueError) as e:  # ValueError: a bad limit
        log.error("cannot start: %s", e)
        return 2
    warning = open_warning("the predictor", [what for flag, what in (
        (auth, "anyone can send observations and read estimates (--token-file)"),
        (tls, "plaintext (--tls-cert, --tls-key)")) if not flag])
    if warning:
        log.warning(warning)
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum, _frame) -> None:
        # Neither logging nor stop.set() here: the handler runs in the main thread, which may
        # hold the log writer's lock or the event's at that instant (plain Locks: deadlock; a
        # SIGTERM just after the "serving" line hung the process so).
        received.append(signum)
        threading.Thread(target=stop.set, daemon=True).start()

    # Before "serving": a SIGTERM from anyone who saw that line gets the graceful stop.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("predictor serving on %s:%d (profile %s)", args.listen.rsplit(":", 1)[0],
             running.port, args.profile)
    saver = _periodic_save(running, args)
    stop.wait()
    log.info("received %s, shutting down", signal.Signals(received[0]).name)
    running.health.enter_graceful_shutdown()  # NOT_SERVING during the drain
    # Stop first, so observations from calls finishing within the grace are saved too.
    running.stop(args.grace).wait()
    if saver is not None:
        saver.stop()
    if args.state:
        try:
            size = running.predictor.save(args.state)
        except OSError as e:
            log.error("cannot save state to %s: %s", args.state, e)
            return 1
        log.info("state saved to %s (%d bytes)", args.state, size)
    return 0


def _periodic_save(running: RunningPredictor, args: argparse.Namespace) -> PeriodicSaver | None:
    """With --state, the state is also saved every --save-interval seconds (if it changed),
    not only on SIGTERM: a SIGKILL or a crash then loses at most that interval."""
    if not args.state:
        return None
    return PeriodicSaver(running.predictor.snapshot, args.state, args.save_interval).start()


if __name__ == "__main__":
    raise SystemExit(main())
