"""`astraea-gateway`: serve the OpenAI API (chat, responses, completions) for a control plane.

Without an API key the gateway serves loopback addresses only (anyone who can reach it could
run the model); a non-loopback --listen then is refused at start with a message saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
import time

from astraea.auth import (
    ClientCredentials,
    KeyRing,
    add_client_arguments,
    client_credentials_from_args,
)
from astraea.store import Store, StoreError, open_store
from astraea.telemetry import get_logger, prometheus
from astraea.telemetry.setup import add_log_level_argument, setup_service_telemetry
from gateway.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RESPONSE_RETENTION_S,
    DEFAULT_SESSION_IDLE_S,
    GatewayConfig,
)

log = get_logger("astraea.gateway")

DEFAULT_LISTEN = "127.0.0.1:8000"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_keys(keys: list[str], key_file: str | None) -> dict[str, str]:
    """Each accepted key and its owner id: the keys given, plus one per non-blank, non-#
    line of `key_file`. As the control plane's key files: `name:key` names the owner, a bare
    key's owner is an id derived from it. ValueError for a malformed entry."""
    sources = [("--api-key", [k for k in keys if k])]
    if key_file:
        with open(key_file) as f:
            sources.append((key_file, f.read().splitlines()))
    owners: dict[str, str] = {}
    for source, lines in sources:
        if any(line.strip() and not line.strip().startswith("#") for line in lines):
            owners.update(KeyRing.parse(lines, source).owners)
    return owners


def read_url(path: str) -> str:
    """The database URL in `path`: its first non-blank line."""
    with open(path) as f:
        for line in f:
            if line.strip():
                return line.strip()
    raise ValueError(f"--database-file {path}: the file is empty")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astraea-gateway",
                                description="OpenAI API (chat completions, responses, "
                                            "completions) for an Astraea stack")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to serve HTTP on")
    p.add_argument("--control-plane", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the control plane's AgentService")
    p.add_argument("--control-plane-retry-s", type=float, default=30.0, metavar="S",
                   help="retry calls the control plane cannot take (UNAVAILABLE: restarting) "
                        "for up to S seconds, resuming cut token streams, so a turn in flight "
                        "goes on in its job; 0: answer 503 at once (default: 30)")
    p.add_argument("--model", required=True,
                   help="the model name clients send (listed by /v1/models)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a local Hugging Face folder with the model's tokenizer (and chat "
                        "template)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable); "
                        "NAME:KEY names its owner. Stored Responses and sessions belong to "
                        "the owner of the key that made them")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="more keys, one per line (NAME:KEY names the owner, as the control "
                        "plane's key files)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--session-idle-s", type=float, default=DEFAULT_SESSION_IDLE_S,
                   help="end a session's job (freeing its KV) after this long without a "
                        "request")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", default=None, metavar="DIR",
                       help="keep stored Responses and named sessions in SQLite in DIR: they "
                            "survive a restart, and gateways on the same state share them "
                            "(default: none: in memory, a restart loses them)")
    where.add_argument("--database", default=None, metavar="URL",
                       help="the same in PostgreSQL: postgresql://user@host/db (what several "
                            "gateways on several hosts share)")
    where.add_argument("--database-file", default=None, metavar="FILE",
                       help="--database with the URL read from FILE (a mounted secret: a URL "
                            "with a password stays off the command line)")
    p.add_argument("--response-retention-s", type=float, default=DEFAULT_RESPONSE_RETENTION_S,
                   metavar="SECONDS",
                   help="with --state-dir/--database: delete a stored Response this long "
                        "after its creation (in memory the newest 10,000 are kept)")
    p.add_argument("--database-reconnect", type=float, default=60.0, metavar="SECONDS",
                   help="how long a lost database connection is retried (with backoff) before "
                        "the store fails for good (default 60)")
    # What the gateway presents to the control plane, itself a client of AgentService.
    add_client_arguments(p, "--control-plane-key-file", tls_prefix="--control-plane-",
                         title="the control plane's key and TLS",
                         key_help="the key the gateway sends to the control plane (one of its "
                                  "--api-key-file keys; the first entry of FILE)")
    add_log_level_argument(p)
    prometheus.add_metrics_arguments(p)
    return p


async def _serve(config: GatewayConfig, host: str, port: int, control_plane: str,
                 credentials: ClientCredentials | None = None, state: Store | None = None,
                 retry_s: float = 0.0) -> int:
    import uvicorn

    from astraea.client import AsyncAgentClient, RetryPolicy
    from gateway.app import create_app
    from gateway.chat import ChatTokenizer

    tokenizer = ChatTokenizer(config.tokenizer, config.chat_template)
    credentials = credentials or ClientCredentials()
    channel = credentials.aio_channel(control_plane)
    try:
        # Short calls are bounded; a segment takes what it takes.
        client = AsyncAgentClient(channel=channel, timeout=30.0, segment_timeout=None,
                                  api_key=credentials.key)
        if retry_s > 0:
            client.retry = RetryPolicy(total_s=retry_s)
        app = prometheus.instrument_asgi(  # /metrics
            create_app(config, client, tokenizer, state=state))
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                               access_log=False, lifespan="on"))
        server.install_signal_handlers = lambda: None  # ours below: stop on SIGTERM too
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            log.info("serving", listen=f"{host}:{port}", control_plane=control_plane,
                     model=config.model, api_keys=len(config.api_keys))
        await task
        return 0 if server.started else 1
    finally:
        await channel.close()
        if state is not None:
            state.close()  # commits what is queued


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = split_address(args.listen)
        keys = read_keys(args.api_key, args.api_key_file)
        credentials = client_credentials_from_args(args, "--control-plane-key-file",
                                                   tls_prefix="--control-plane-")
        if args.database_file:
            args.database = read_url(args.database_file)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.database_reconnect < 0:
        parser.error("--database-reconnect must be >= 0")
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be positive")
    if not args.control_plane_retry_s >= 0:
        parser.error("--control-plane-retry-s must be 0 or more")
    if not args.session_idle_s > 0:
        parser.error("--session-idle-s must be positive")
    if not args.response_retention_s > 0:
        parser.error("--response-retention-s must be positive")
    if not keys and not is_loopback(host):
        parser.error(f"--listen {args.listen} is not a loopback address and no --api-key is "
                     "set: anyone who can reach it could use the model. Give --api-key (or "
                     "--api-key-file), or listen on 127.0.0.1")
    template = None
    if args.chat_template:
        with open(args.chat_template) as f:
            template = f.read()
    config = GatewayConfig(model=args.model, tokenizer=args.tokenizer, api_keys=keys,
                           max_body_bytes=args.max_body_bytes,
                           session_idle_s=args.session_idle_s, chat_template=template,
                           created_unix_s=int(time.time()),
                           response_retention_s=args.response_retention_s)
    state = None
    if args.database or args.state_dir:
        try:
            state = open_store(args.database or args.state_dir,
                               reconnect_timeout_s=args.database_reconnect)
        except (StoreError, OSError) as e:
            print(f"astraea-gateway: cannot open the state store: {e}", file=sys.stderr,
                  flush=True)
            return 2
    tel = setup_service_telemetry(parser, "astraea-gateway", args.log_level, args)
    if not keys:
        print(f"astraea-gateway: no API key set: serving loopback ({host}) only",
              file=sys.stderr, flush=True)
    try:
        return asyncio.run(_serve(config, host, port, args.control_plane, credentials, state,
                                  args.control_plane_retry_s))
    finally:
        tel.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
