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

from astraea.auth import ClientCredentials, add_client_arguments, client_credentials_from_args
from astraea.telemetry import get_logger, prometheus
from astraea.telemetry.setup import add_log_level_argument, setup_service_telemetry
from gateway.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_SESSION_IDLE_S, GatewayConfig

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


def read_keys(keys: list[str], key_file: str | None) -> frozenset[str]:
    """The keys given, plus one per non-blank, non-# line of `key_file`."""
    out = {k for k in keys if k}
    if key_file:
        with open(key_file) as f:
            out |= {line.strip() for line in f if line.strip() and not line.startswith("#")}
    return frozenset(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astraea-gateway",
                                description="OpenAI API (chat completions, responses, "
                                            "completions) for an Astraea stack")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to serve HTTP on")
    p.add_argument("--control-plane", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the control plane's AgentService")
    p.add_argument("--model", required=True,
                   help="the model name clients send (listed by /v1/models)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a local Hugging Face folder with the model's tokenizer (and chat "
                        "template)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="more keys, one per line")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--session-idle-s", type=float, default=DEFAULT_SESSION_IDLE_S,
                   help="end a session's job (freeing its KV) after this long without a "
                        "request")
    # What the gateway presents to the control plane, itself a client of AgentService.
    add_client_arguments(p, "--control-plane-key-file", tls_prefix="--control-plane-",
                         title="the control plane's key and TLS",
                         key_help="the key the gateway sends to the control plane (one of its "
                                  "--api-key-file keys; the first entry of FILE)")
    add_log_level_argument(p)
    prometheus.add_metrics_arguments(p)
    return p


async def _serve(config: GatewayConfig, host: str, port: int, control_plane: str,
                 credentials: ClientCredentials | None = None) -> int:
    import uvicorn

    from astraea.client import AsyncAgentClient
    from gateway.app import create_app
    from gateway.chat import ChatTokenizer

    tokenizer = ChatTokenizer(config.tokenizer, config.chat_template)
    credentials = credentials or ClientCredentials()
    channel = credentials.aio_channel(control_plane)
    try:
        # Short calls are bounded; a segment takes what it takes.
        client = AsyncAgentClient(channel=channel, timeout=30.0, segment_timeout=None,
                                  api_key=credentials.key)
        app = prometheus.instrument_asgi(create_app(config, client, tokenizer))  # /metrics
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = split_address(args.listen)
        keys = read_keys(args.api_key, args.api_key_file)
        credentials = client_credentials_from_args(args, "--control-plane-key-file",
                                                   tls_prefix="--control-plane-")
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be positive")
    if not args.session_idle_s > 0:
        parser.error("--session-idle-s must be positive")
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
                           created_unix_s=int(time.time()))
    tel = setup_service_telemetry(parser, "astraea-gateway", args.log_level, args)
    if not keys:
        print(f"astraea-gateway: no API key set: serving loopback ({host}) only",
              file=sys.stderr, flush=True)
    try:
        return asyncio.run(_serve(config, host, port, args.control_plane, credentials))
    finally:
        tel.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
