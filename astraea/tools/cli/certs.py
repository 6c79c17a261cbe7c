"""`astraea certs DIR`: development TLS certificates (a CA, a server and a client certificate)
for the services' --tls-* flags; with `--deploy compose|k8s`, every key and certificate file
that docker/compose.yaml or docker/k8s/base mounts."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ce = sub.add_parser("certs", help="write a development CA, a server certificate (localhost, "
                                      "127.0.0.1) and a client certificate to DIR")
    ce.add_argument("dir", help="the directory to write them to (created if needed)")
    ce.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                    help="more names or addresses the server certificate is valid for "
                         "(repeatable, or comma-separated)")
    ce.add_argument("--deploy", choices=["compose", "k8s"], default=None,
                    help="also write the keys and tokens of every service, and the gateway's "
                         "API keys, as the files docker/compose.yaml (docker/secrets) or "
                         "docker/k8s/base (its secrets/) mounts; the server certificate is "
                         "valid for the service names there")
    ce.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    from astraea.tools.devcerts import GATEWAY_API_KEYS, make_dev_certs, write_deploy_secrets

    hosts = tuple(h.strip() for arg in args.hosts for h in arg.split(",") if h.strip())
    if args.deploy:
        sec = write_deploy_secrets(args.dir, args.deploy, hosts)
        certs = sec.certs
    else:
        certs = make_dev_certs(args.dir, hosts)
    print(f"development certificates in {args.dir} (the CA's key is beside them: for "
          "development only)")
    print(f"  CA               {certs.ca}    (--tls-ca of clients, workers and services)")
    print(f"  server cert/key  {certs.server_cert} {certs.server_key}    (--tls-cert/--tls-key; "
          f"valid for {', '.join(certs.hosts)})")
    print(f"  client cert/key  {certs.client_cert} {certs.client_key}    (mutual TLS: a client's "
          "certificate, with --tls-client-auth on the server)")
    if args.deploy:
        print(f"keys for docker/{'compose.yaml' if args.deploy == 'compose' else 'k8s/base'}:")
        print(f"  {sec.api_key_file}    (the control plane's client keys: 'client' and "
              "'gateway')")
        print(f"  {sec.client_key_file}    (the 'client' key, for agent clients)")
        print(f"  {sec.gateway_key_file}    (the gateway's key to the control plane)")
        print(f"  {sec.worker_token_file}    (the workers' registration token)")
        print(f"  {sec.predictor_token_file}    (the control plane's token to the predictor)")
        print(f"  {sec.certs.ca.parent / GATEWAY_API_KEYS}    (the gateway's HTTP API key)")
    return 0
