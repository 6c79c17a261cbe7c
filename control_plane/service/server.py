"""The control-plane server: AgentService and WorkerService on one grpc.aio server.

    astraea-control-plane --listen 127.0.0.1:50051 --policy astraea --profile gptj-6b-a100

Service-time estimates come from an in-process `OnlineEstimator`, or, with `--predictor
host:port`, from a `PredictorLink`: local estimates always, the remote predictor's when it
answers within the timeout (see predictor_link.py). The standard gRPC health service reports
SERVING while up and NOT_SERVING from the start of a graceful stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from astraea.profile import ProfileError, load_profile
from astraea.telemetry import (
    Metrics,
    get_logger,
    setup_service_telemetry,
)
from astraea.v1 import agent_pb2_grpc, worker_pb2, worker_pb2_grpc
from control_plane.core.config import SchedulerConfig
from control_plane.core.policies import POLICIES, build_scheduler
from control_plane.service.agent_service import AgentServicer
from control_plane.service.context import ControlPlane, ServiceConfig
from control_plane.service.planner import Planner
from control_plane.service.predictor_link import DEFAULT_TIMEOUT_S, PredictorLink
from control_plane.service.worker_stream import WorkerStreamServicer
from predictor_svc.estimators import OnlineEstimator

log = get_logger("astraea.control_plane")

DEFAULT_LISTEN = "127.0.0.1:50051"
SHUTDOWN_GRACE_S = 5.0
SERVICE_NAMES = ("astraea.v1.AgentService", "astraea.v1.WorkerService")


async def serve(listen: str = DEFAULT_LISTEN, policy: str = "astraea",
                profile: str = "gptj-6b-a100", config: ServiceConfig | None = None,
                scheduler_config: SchedulerConfig | None = None, *,
                predictor: str | None = None, metrics: Metrics | None = None,
                predictor_timeout_s: float = DEFAULT_TIMEOUT_S) -> grpc.aio.Server:
    """Start a control plane on `listen` (port 0 picks one) and return the running server.

    `predictor` (host:port) consults a remote predictor through a `PredictorLink`; None uses
    in-process estimates only. `metrics` records the predictor fallbacks (default: from the
    global meter provider). The bound port is `server.bound_port`, the state
    `server.control_plane`, the link (or None) `server.predictor_link`, the health servicer
    `server.health`; stop it with `await stop(server)`, which also closes the worker streams,
    the planner and the link."""
    prof = load_profile(profile)
    link = None
    if predictor:
        link = PredictorLink(predictor, metrics=metrics, timeout_s=predictor_timeout_s)
    estimator = link if link is not None else OnlineEstimator()
    scheduler = build_scheduler(policy, prof, estimator, scheduler_config)
    cp = ControlPlane(scheduler, config or ServiceConfig())
    planner = Planner(cp)
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(cp), server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerStreamServicer(cp), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    if link is not None:
        await link.start()
    server.bound_port = port  # type: ignore[attr-defined]
    server.control_plane = cp  # type: ignore[attr-defined]
    server.planner = planner  # type: ignore[attr-defined]
    server.health = health  # type: ignore[attr-defined]
    server.predictor_link = link  # type: ignore[attr-defined]
    server.planner_task = asyncio.create_task(planner.run(), name="planner")  # type: ignore[attr-defined]
    log.info("control plane serving", port=port, policy=policy, profile=profile,
             predictor=predictor or "local")
    return server


async def stop(server: grpc.aio.Server, grace: float = SHUTDOWN_GRACE_S,
               drain: bool = False) -> None:
    """Graceful stop: tell workers to shut down, refuse new calls, give in-flight calls
    `grace` seconds, then stop planning."""
    cp: ControlPlane = server.control_plane  # type: ignore[attr-defined]
    # NOT_SERVING first, so load balancers and `astraea up` stop sending work during the drain.
    await server.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
    for entry in list(cp.registry.workers.values()):
        entry.outbound.put_nowait(worker_pb2.ControlMessage(
            shutdown=worker_pb2.Shutdown(reason="control plane stopping", drain=drain)))
        entry.outbound.put_nowait(None)
    await server.stop(grace)
    task: asyncio.Task = server.planner_task  # type: ignore[attr-defined]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    link: PredictorLink | None = server.predictor_link  # type: ignore[attr-defined]
    if link is not None:
        await link.close()


async def _main_async(args: argparse.Namespace, metrics: Metrics | None = None) -> int:
    try:
        server = await serve(args.listen, args.policy, args.profile,
                             ServiceConfig(time_scale=args.time_scale),
                             predictor=args.predictor, metrics=metrics,
                             predictor_timeout_s=args.predictor_timeout)
    except (ProfileError, OSError, ValueError) as e:
        log.error("cannot start", error=str(e))
        return 2
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", grace_s=args.grace)
    await stop(server, args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--log-level", default=None,
                        help="debug … critical (default: $ASTRAEA_LOG_LEVEL or info)")
    args = parser.parse_args(argv)
    if not args.predictor_timeout > 0:
        parser.error("--predictor-timeout must be positive")
    tel = setup_service_telemetry(parser, "astraea-control-plane", args.log_level)
    try:
        return asyncio.run(_main_async(args, tel.metrics))
    finally:
        tel.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
