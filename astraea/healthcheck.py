"""A container health probe: exit 0 iff a gRPC health service answers SERVING.

    python -m astraea.healthcheck HOST:PORT [--service NAME] [--timeout S] [--tls-ca FILE]

It asks the standard health service (grpc.health.v1, which the control plane and the predictor
serve) about NAME, by default "" (the whole server). Docker and docker compose read the exit
status: 0 healthy, 1 unhealthy (Docker reserves 2; only a usage error from argparse gives it).
Anything but SERVING, including an unreachable address or a timeout, is unhealthy and says why in
one line on stderr, which `docker inspect` shows in the health log.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_HEALTHY, EXIT_UNHEALTHY = 0, 1
DEFAULT_TIMEOUT_S = 2.0


def check(address: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
          tls_ca: str | None = None) -> tuple[bool, str]:
    """Ask `address` whether `service` is SERVING (over TLS verified against `tls_ca`, if
    given; the health service needs no key). Returns (serving, what was found)."""
    what = f"{address} service {service!r}" if service else address
    if tls_ca:
        with open(tls_ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{what}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m astraea.healthcheck",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--service", default="",
                        help='service name to ask about (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="seconds to wait for the answer; keep it below the health check's "
                             "own timeout, so a slow answer reads as unhealthy, not as killed")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="the server speaks TLS: verify it against this PEM CA")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    try:
        serving, found = check(args.address, args.service, args.timeout, args.tls_ca)
    except OSError as e:
        serving, found = False, f"cannot read --tls-ca {args.tls_ca}: {e.strerror}"
    if serving:
        print(found)
        return EXIT_HEALTHY
    print(f"unhealthy: {found}", file=sys.stderr)
    return EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
