"""A container health probe: exit 0 iff a gRPC health service answers SERVING.

    python -m astraea.healthcheck HOST:PORT [--service NAME] [--timeout S] [--tls-ca FILE]
                                  [--tls-cert FILE --tls-key FILE]

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


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def check(address: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
          tls_ca: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None) -> tuple[bool, str]:
    """Ask `address` whether `service` is SERVING (over TLS verified against `tls_ca`, if
    given, presenting `tls_cert` to a server that wants mutual TLS; the health service needs
    no key). Returns (serving, what was found)."""
    what = f"{address} service {service!r}" if service else address
    if tls_ca:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            _read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)))
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
    parser.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="with --tls-ca: a client certificate, for a server that requires "
                             "one (--tls-client-auth); the service's own certificate will do")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert and --tls-key go together, and with --tls-ca")
    try:
        serving, found = check(args.address, args.service, args.timeout, args.tls_ca,
                               args.tls_cert, args.tls_key)
    except OSError as e:
        serving, found = False, f"cannot read {e.filename}: {e.strerror}"
    if serving:
        print(found)
        return EXIT_HEALTHY
    print(f"unhealthy: {found}", file=sys.stderr)
    return EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
