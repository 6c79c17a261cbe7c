"""`astraea certs DIR`: development TLS certificates (a CA, a server and a client certificate)
for the services' --tls-* flags."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ce = sub.add_parser("certs", help="write a development CA, a server certificate (localhost, "
                                      "127.0.0.1) and a client certificate to DIR")
    ce.add_argument("dir", help="the directory to write them to (created if needed)")
    ce.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                    help="one more name or address the server certificate is valid for "
                         "(repeatable)")
    ce.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    from astraea.tools.devcerts import make_dev_certs

    certs = make_dev_certs(args.dir, tuple(args.hosts))
    print(f"development certificates in {args.dir} (the CA's key is beside them: for "
          "development only)")
    print(f"  CA               {certs.ca}    (--tls-ca of clients, workers and services)")
    print(f"  server cert/key  {certs.server_cert} {certs.server_key}    (--tls-cert/--tls-key; "
          f"valid for {', '.join(certs.hosts)})")
    print(f"  client cert/key  {certs.client_cert} {certs.client_key}    (mutual TLS: a client's "
          "certificate, with --tls-client-auth on the server)")
    return 0
