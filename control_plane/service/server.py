"""The control-plane server: AgentService and WorkerService on one grpc.aio server.

    astraea-control-plane --listen 127.0.0.1:50051 --policy astraea --profile gptj-6b-a100

Service-time estimates come from an in-process `OnlineJobEstimator`, or, with `--predictor
host:port`, from a `PredictorLink`: local estimates always, the remote predictor's when it
answers within the timeout (see predictor_link.py). The standard gRPC health service reports
SERVING while up and NOT_SERVING from the start of a graceful stop. Every bound on input,
messages, concurrency and memory is in limits.py (flags under "limits" in --help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.trace import Tracer

from astraea.auth import (
    AioAuthInterceptor,
    AuthPolicy,
    ClientCredentials,
    KeyRing,
    ServerTLS,
    add_port,
    add_server_arguments,
    open_warning,
    server_tls_from_args,
)
from astraea.profile import ProfileError, load_profile
from astraea.rpc_guard import AioRequestGuard
from astraea.store import STORE_WRITERS, StoreError, open_store
from astraea.telemetry import (
    Metrics,
    add_log_level_argument,
    get_logger,
    prometheus,
    setup_service_telemetry,
)
from astraea.v1 import agent_pb2_grpc, worker_pb2, worker_pb2_grpc
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import HintedEstimator, OnlineJobEstimator
from control_plane.core.policies import POLICIES, build_scheduler
from control_plane.service import limits
from control_plane.service.agent_service import AgentServicer
from control_plane.service.context import ControlPlane, ServiceConfig
from control_plane.service.durable import Durability
from control_plane.service.planner import Planner
from control_plane.service.predictor_link import DEFAULT_TIMEOUT_S, PredictorLink
from control_plane.service.worker_stream import WorkerStreamServicer

log = get_logger("astraea.control_plane")

DEFAULT_LISTEN = "127.0.0.1:50051"
SHUTDOWN_GRACE_S = 5.0
STOP_MARGIN_S = 3.0  # beyond the grace, for the planner, the watchdog and the predictor link
SERVICE_NAMES = ("astraea.v1.AgentService", "astraea.v1.WorkerService")


@dataclass(frozen=True)
class RunningControlPlane:
    """A control plane `serve` started: its gRPC server, the port it bound, its state and the
    tasks it runs. `await stop()` ends all of it."""

    server: grpc.aio.Server
    port: int
    control_plane: ControlPlane
    planner: Planner
    health: HealthServicer  # SERVING while up, NOT_SERVING from the start of a graceful stop
    predictor_link: PredictorLink | None  # None: in-process estimates only
    tasks: tuple[asyncio.Task, ...]  # the planner, the worker watchdog, the housekeeping

    async def stop(self, grace: float = SHUTDOWN_GRACE_S, drain: bool = False) -> None:
        """Graceful stop: tell workers to shut down, refuse new calls, give in-flight calls
        `grace` seconds, then stop planning, the watchdog and the predictor link."""
        cp = self.control_plane
        # NOT_SERVING first, so load balancers and `astraea up` stop sending work during the
        # drain.
        await self.health.enter_graceful_shutdown()
        if cp.durable is not None:
            cp.durable.stopping = True
        for entry in list(cp.registry.workers.values()):
            entry.outbound.put_nowait(worker_pb2.ControlMessage(
                shutdown=worker_pb2.Shutdown(reason="control plane stopping", drain=drain)))
            entry.outbound.put_nowait(None)
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.predictor_link is not None:
            await self.predictor_link.close()
        durable = self.control_plane.durable
        if durable is not None:
            with contextlib.suppress(StoreError):  # failed: logged when it did
                durable.drain()  # the merged writes the gate had not queued yet
            await durable.store.close_async()  # commits what is queued


async def serve(listen: str = DEFAULT_LISTEN, policy: str = "astraea",
                profile: str = "gptj-6b-a100", config: ServiceConfig | None = None,
                scheduler_config: SchedulerConfig | None = None, *,
                predictor: str | None = None, metrics: Metrics | None = None,
                predictor_timeout_s: float = DEFAULT_TIMEOUT_S,
                tracer: Tracer | None = None, auth: AuthPolicy | None = None,
                tls: ServerTLS | None = None,
                predictor_credentials: ClientCredentials | None = None,
                # A state directory (SQLite) or a postgresql:// URL: jobs are durable and the
                # unfinished ones restored at start (durable.py); None: in memory only.
                state: str | None = None) -> RunningControlPlane:
    """Start a control plane on `listen` (port 0 picks one) and return it running.

    `predictor` (host:port) consults a remote predictor through a `PredictorLink`; None uses
    in-process estimates only. `metrics` records JCT, plan latency, queue lengths, KV use and
    predictor fallbacks, `tracer` the jobs' spans (default: the global providers'). `auth`
    checks the callers' keys per service, `tls` serves TLS, `predictor_credentials` is what
    the link presents to the predictor (None of them: plaintext, no keys)."""
    prof = load_profile(profile)
    config = config or ServiceConfig()
    link = None
    if predictor:
        # The link's intervals stay in wall time even on a fast stack: scaled down to engine
        # time, its calls cost the control plane more than fresher estimates gained (measured
        # with compare-live at 10x real time: live/sim 1.13-1.16 against 1.08).
        link = PredictorLink(predictor, metrics=metrics, timeout_s=predictor_timeout_s,
                             tracer=tracer, credentials=predictor_credentials)
    # Clients' own hints (expected output, expected tool time) win over every prediction.
    estimator = HintedEstimator(link if link is not None else OnlineJobEstimator())
    scheduler = build_scheduler(policy, prof, estimator, scheduler_config)
    cp = ControlPlane(scheduler, config, policy=policy, tracer=tracer,
                      metrics=metrics, step_observer=link)
    cp.metrics.set_jobs_in_flight_source(lambda: sum(cp.registry.unfinished_by_client.values()))
    prometheus.export_scheduler(cp.metrics)  # /metrics, when the process serves it
    planner = Planner(cp)
    cp.set_on_change(planner.mark_dirty, planner.plan_if_overdue)
    gate = _open_state(cp, state) if state else None
    # Keys are checked first: an unauthenticated caller learns nothing, not even a parse error.
    interceptors = [AioRequestGuard()] if auth is None else [AioAuthInterceptor(auth),
                                                             AioRequestGuard()]
    server = grpc.aio.server(interceptors=[*prometheus.aio_server_interceptors(), *interceptors],
                             options=config.server_options(),
                             maximum_concurrent_rpcs=config.concurrent_rpcs)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(cp), server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerStreamServicer(cp), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = add_port(server, listen, tls)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    if link is not None:
        await link.start()
    tasks = (asyncio.create_task(planner.run(), name="planner"),
             asyncio.create_task(_watch_workers(cp), name="worker-watchdog"),
             asyncio.create_task(_housekeeping(cp), name="housekeeping"),
             *([asyncio.create_task(gate(), name="durable-gate")] if gate else []))
    log.info("control plane serving", port=port, policy=policy, profile=profile,
             predictor=predictor or "local",
             settings=(scheduler_config or SchedulerConfig()).changed() or "defaults")
    return RunningControlPlane(server, port, cp, planner, health, link, tasks)


def _open_state(cp: ControlPlane, state: str):
    """Open the store, restore its unfinished jobs into `cp`; returns the event gate's loop
    to run (durable.py). StoreError if the store cannot be opened."""
    store = open_store(state, reconnect_timeout_s=cp.config.store_reconnect_timeout_s,
                       writer=cp.config.store_writer)
    try:
        cp.durable = Durability(store)
        restored = cp.durable.restore(cp)
    except BaseException:
        store.close()
        raise
    log.info("durable state opened", store=store.url, restored_jobs=restored)
    return cp.durable.run_gate


async def _watch_workers(cp: ControlPlane) -> None:
    """Drop workers that went silent (see `ControlPlane.drop_silent_workers`)."""
    timeout = cp.config.worker_timeout_s
    if not timeout > 0:
        return
    while True:
        await asyncio.sleep(timeout / 4)
        cp.drop_silent_workers(time.monotonic())


async def _housekeeping(cp: ControlPlane) -> None:
    """Forget finished jobs after the retention window and end abandoned API waits
    (`ControlPlane.expire`), a few times per the shorter of the two periods."""
    cfg = cp.config
    periods = [p for p in (cfg.finished_retention_s, cfg.api_wait_timeout_s) if p > 0]
    interval = min(max(min(periods, default=4.0) / 4, 0.05), 5.0)
    while True:
        await asyncio.sleep(interval)
        cp.expire(time.monotonic())
        if cp.durable is not None:
            cp.durable.prune(cfg.finished_retention_s)
            cp.durable.expire_cut(cp, time.monotonic())


def _security(args: argparse.Namespace) -> tuple[AuthPolicy | None, ServerTLS | None,
                                                 ClientCredentials]:
    """The keys, TLS and predictor credentials the flags ask for; one warning line for what is
    left open. Raises ValueError (AuthConfigError) for a file that cannot be used."""
    rings = {}
    if args.api_key_file:
        rings[SERVICE_NAMES[0]] = KeyRing.from_file(args.api_key_file)
    if args.worker_token_file:
        rings[SERVICE_NAMES[1]] = KeyRing.from_file(args.worker_token_file)
    tls = server_tls_from_args(args)
    predictor = ClientCredentials.from_files(
        args.predictor_token_file, args.tls_ca, args.tls_cert if args.tls_ca else None,
        args.tls_key if args.tls_ca else None)
    warning = open_warning("the control plane", [what for flag, what in (
        (args.api_key_file, "any client can start, read and cancel any job (--api-key-file)"),
        (args.worker_token_file, "any process can register as a worker and receive prompts "
                                 "(--worker-token-file)"),
        (tls, "plaintext (--tls-cert, --tls-key)")) if not flag])
    if warning:
        log.warning(warning)
    return (AuthPolicy(rings) if rings else None), tls, predictor


async def _main_async(args: argparse.Namespace, metrics: Metrics | None = None) -> int:
    try:
        auth, tls, predictor_credentials = _security(args)
        running = await serve(args.listen, args.policy, args.profile,
                              ServiceConfig(time_scale=args.time_scale,
                                            worker_timeout_s=args.worker_timeout,
                                            store_reconnect_timeout_s=args.database_reconnect,
                                            store_writer=args.store_writer,
                                            **limits.from_args(args)),
                              predictor=args.predictor, metrics=metrics,
                              predictor_timeout_s=args.predictor_timeout, auth=auth, tls=tls,
                              predictor_credentials=predictor_credentials,
                              state=args.database or args.state_dir,
                              scheduler_config=args.scheduler_config)
    except (ProfileError, OSError, ValueError, StoreError) as e:
        log.error("cannot start", error=str(e))
        return 2
    freeze_startup_objects()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", grace_s=args.grace)
    try:
        # Bounded: a stop that hangs (seen once in CI, under heavy I/O) must not keep the
        # process from exiting; the log then says which phase did not finish.
        await asyncio.wait_for(running.stop(args.grace), args.grace + STOP_MARGIN_S)
    except TimeoutError:
        log.error("graceful stop did not finish; exiting anyway",
                  seconds=args.grace + STOP_MARGIN_S)
        return 1
    log.info("stopped")
    return 0


def freeze_startup_objects() -> None:
    """What start-up made (modules, proto descriptors, the core, telemetry) lives as long as
    the process: frozen, it leaves the cyclic collector's scans. Measured under
    `astraea bench-service`, full collections then pause the event loop about half as long."""
    gc.collect()
    gc.freeze()


def build_parser() -> argparse.ArgumentParser:
    """The command line of `astraea-control-plane` (tests check docker/compose.yaml against it)."""
    parser = argparse.ArgumentParser(prog="astraea-control-plane",
                                     description="Astraea control plane (gRPC)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to serve on")
    parser.add_argument("--policy", default="astraea", choices=sorted(POLICIES))
    parser.add_argument("--profile", default="gptj-6b-a100",
                        help="hardware profile name or JSON path")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="wall seconds per scheduler second; match the workers' --time-scale")
    parser.add_argument("--grace", type=float, default=SHUTDOWN_GRACE_S,
                        help="seconds in-flight calls get to finish on shutdown")
    parser.add_argument("--predictor", default=None, metavar="HOST:PORT",
                        help="remote predictor service (default: in-process estimates only)")
    parser.add_argument("--predictor-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        metavar="SECONDS", help="timeout of each call to the predictor")
    parser.add_argument("--worker-timeout", type=float, default=ServiceConfig.worker_timeout_s,
                        metavar="SECONDS",
                        help="drop a worker that sent nothing (not even a heartbeat) for this "
                             "long and re-queue its jobs; 0 never drops one")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--state-dir", default=None, metavar="DIR",
                       help="keep jobs durable in SQLite in DIR and restore the unfinished "
                            "ones on restart (default: none: state in memory only, a restart "
                            "loses every job)")
    where.add_argument("--database", default=None, metavar="URL",
                       help="the same in PostgreSQL: postgresql://user@host/db")
    parser.add_argument("--database-reconnect", type=float,
                        default=ServiceConfig.store_reconnect_timeout_s, metavar="SECONDS",
                        help="how long a lost database connection is retried (with backoff) "
                             "before the store fails for good; meanwhile new jobs get "
                             "UNAVAILABLE (default 60)")
    parser.add_argument("--store-writer", choices=STORE_WRITERS,
                        default=ServiceConfig.store_writer,
                        help="where SQLite's statements run: a child process driven by the "
                             "event loop (default) or a thread of this process")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        dest="settings",
                        help="override a scheduling setting (control_plane/core/config.py), "
                             "e.g. --set mlfq.num_levels=3; repeat for more")
    limits.add_arguments(parser)
    security = add_server_arguments(parser)
    security.add_argument("--api-key-file", default=None, metavar="FILE",
                          help="AgentService callers must send one of these keys (one per line, "
                               "optionally name:key; the name owns the jobs its key starts)")
    security.add_argument("--worker-token-file", default=None, metavar="FILE",
                          help="workers must send one of these tokens to register")
    security.add_argument("--predictor-token-file", default=None, metavar="FILE",
                          help="the token to send to the predictor (its --token-file)")
    add_log_level_argument(parser)
    prometheus.add_metrics_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.predictor_timeout > 0:
        parser.error("--predictor-timeout must be positive")
    if args.worker_timeout < 0:
        parser.error("--worker-timeout must be 0 (never) or positive")
    if args.database_reconnect < 0:
        parser.error("--database-reconnect must be >= 0")
    try:
        limits.Limits(**limits.from_args(args))
        args.scheduler_config = SchedulerConfig.from_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))
    tel = setup_service_telemetry(parser, "astraea-control-plane", args.log_level, args)
    try:
        return asyncio.run(_main_async(args, tel.metrics))
    finally:
        tel.shutdown()
        log.info("exiting")


if __name__ == "__main__":
    raise SystemExit(main())
