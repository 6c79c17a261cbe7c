"""Who may call a service, and over what: bearer keys checked per call, TLS on the channel.

Server side: a `KeyRing` (read from a key file: one key per line, optionally ``name:key``, the
name being the caller's owner id) guards each gRPC service named in an `AuthPolicy`. The
interceptors (`AioAuthInterceptor` for grpc.aio servers, `AuthInterceptor` for thread-pool
ones) answer a call without ``authorization: Bearer KEY`` metadata, or with a key not on the
ring, with UNAUTHENTICATED before the servicer sees a message; the refusal is logged once per
client host and reason, without a traceback. An accepted call runs with `caller()` set to the
key's owner id. Services the policy does not name (the health service: probes) stay open.
`ServerTLS` turns a listening port into TLS (mutual TLS when it names a client CA).

Client side: `ClientCredentials` holds the key to send and the TLS files, and opens channels.
Keys go in per-call metadata (not gRPC call credentials), so a key also works on a plaintext
loopback channel, where call credentials are refused.
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

log = logging.getLogger("astraea.auth")

AUTH_KEY = "authorization"  # gRPC metadata keys are lower case
BEARER = "Bearer "
MAX_LOGGED_PEERS = 10_000  # refusals logged once per (host, reason); the set is bounded

# The owner id of the key the current call was accepted with ("" where no keys are set: one
# owner for every caller). Set per call by the interceptors.
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("astraea_caller", default="")


def caller() -> str:
    """The owner id of the current call's key; "" when its service checks no keys."""
    return _CALLER.get()


class AuthConfigError(ValueError):
    """A key or certificate file that cannot be used; the message names it and why."""


# --- keys ---------------------------------------------------------------------------------------
def _owner_of(key: str) -> str:
    # A bare key's owner id: stable across restarts and reorderings, and not the key itself.
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _check_key(key: str, where: str) -> None:
    if not key:
        raise AuthConfigError(f"{where}: empty key")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise AuthConfigError(f"{where}: a key must be printable ASCII without spaces")


@dataclass(frozen=True)
class KeyRing:
    """Keys and the owner id each stands for."""

    owners: dict[str, str]  # key -> owner id

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "keys") -> KeyRing:
        owners: dict[str, str] = {}
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            if not sep:
                name, key = "", line
            where = f"{source} line {n}"
            _check_key(key, where)
            if sep and not name:
                raise AuthConfigError(f"{where}: empty name before ':'")
            if key in owners:
                raise AuthConfigError(f"{where}: the same key twice")
            owners[key] = name or _owner_of(key)
        if not owners:
            raise AuthConfigError(f"{source}: no keys (one per line, optionally name:key)")
        return cls(owners)

    @classmethod
    def from_file(cls, path: str) -> KeyRing:
        try:
            with open(path) as f:
                return cls.parse(f.read().splitlines(), path)
        except OSError as e:
            raise AuthConfigError(f"cannot read key file {path}: {e.strerror}") from None

    def owner(self, key: str) -> str | None:
        """The owner id of `key`, None if it is not on the ring. Compares every key in
        constant time, so timing tells nothing of how close a guess was."""
        found = None
        for known, owner in self.owners.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = owner
        return found


def read_key(path: str) -> str:
    """The key a client sends, from a key file: its first entry (the key of ``name:key``). The
    same file can then serve both the service and its callers."""
    return next(iter(KeyRing.from_file(path).owners))


def bearer(metadata: Sequence) -> str | None:
    """The key of an ``authorization: Bearer KEY`` entry of call metadata, or None."""
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        # The scheme is case-insensitive (RFC 6750).
        if key == AUTH_KEY and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[len(BEARER):].strip()
    return None


# --- server side --------------------------------------------------------------------------------
@dataclass
class AuthPolicy:
    """Which services check which keys: gRPC service name ("astraea.v1.AgentService") to its
    ring. Services not named are open."""

    rings: dict[str, KeyRing]
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def ring(self, method: str) -> KeyRing | None:
        return self.rings.get(method.lstrip("/").split("/", 1)[0])

    def check(self, ring: KeyRing, metadata: Sequence) -> tuple[str | None, str]:
        """(owner id, "") for an accepted call, (None, why) for a refused one."""
        key = bearer(metadata)
        if key is None:
            return None, "no 'authorization: Bearer KEY' metadata"
        owner = ring.owner(key)
        return (owner, "") if owner is not None else (None, "the key is not accepted")

    def refused(self, method: str, peer: str, why: str) -> str:
        host = peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer
        if (host, why) not in self._logged:
            if len(self._logged) >= MAX_LOGGED_PEERS:
                self._logged.clear()
            self._logged.add((host, why))
            log.warning("unauthenticated call refused: method=%s peer=%s reason=%s "
                        "(logged once per host and reason)", method, host, why)
        service = method.lstrip("/").split("/", 1)[0]
        return f"{service} requires a key: {why}"


def _aio_authenticated(handler: grpc.RpcMethodHandler, method: str, policy: AuthPolicy,
                       ring: KeyRing) -> grpc.RpcMethodHandler:
    async def admit(context) -> None:
        owner, why = policy.check(ring, context.invocation_metadata())
        if owner is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                policy.refused(method, context.peer() or "", why))
        # Each call runs in its own task: this does not leak into other calls.
        _CALLER.set(owner)

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            await admit(context)
            return await inner_uu(request, context)
        return handler._replace(unary_unary=unary_unary)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            await admit(context)
            return await inner_su(requests, context)
        return handler._replace(stream_unary=stream_unary)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request_or_requests, context):
        await admit(context)  # before the handler reads a message: an impostor sends nothing
        gen = inner(request_or_requests, context)
        try:
            async for resp in gen:
                yield resp
        finally:
            await gen.aclose()
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming)
    return handler._replace(stream_stream=streaming)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """For `grpc.aio.server(interceptors=[AioAuthInterceptor(policy), ...])`."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy
        # method -> (the inner handler, its checking copy): the copy checks each call's
        # metadata when it runs, so it is built once per method, not per call.
        self._checked: dict[str, tuple[grpc.RpcMethodHandler, KeyRing,
                                       grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        ring = self.policy.ring(method)
        if handler is None or ring is None:
            return handler
        cached = self._checked.get(method)
        if cached is not None and cached[0] is handler and cached[1] is ring:
            return cached[2]
        checked = _aio_authenticated(handler, method, self.policy, ring)
        self._checked[method] = (handler, ring, checked)
        return checked


class AuthInterceptor(grpc.ServerInterceptor):
    """For `grpc.server(..., interceptors=[AuthInterceptor(policy), ...])`."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        ring = self.policy.ring(method)
        if handler is None or ring is None:
            return handler
        policy = self.policy
        name = next(n for n in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, n) is not None)
        inner = getattr(handler, name)

        def behaviour(request, context):
            owner, why = policy.check(ring, context.invocation_metadata())
            if owner is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              policy.refused(method, context.peer() or "", why))
            # Set for the handler's own run (a streaming handler's generator runs later,
            # without it); reset because thread-pool threads are reused across calls.
            token = _CALLER.set(owner)
            try:
                return inner(request, context)
            finally:
                _CALLER.reset(token)
        return handler._replace(**{name: behaviour})


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise AuthConfigError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key (PEM files); with `client_ca`, mutual TLS: clients must
    present a certificate that CA signed."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        ca = _read(self.client_ca, "TLS CA") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)


def add_port(server, listen: str, tls: ServerTLS | None) -> int:
    """`server.add_secure_port` with `tls`, else `add_insecure_port`; the port bound."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, tls.credentials())


def add_server_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--tls-cert, --tls-key, --tls-ca and --tls-client-auth; the caller adds its key flags
    to the returned group."""
    g = parser.add_argument_group("security (default: plaintext, no keys checked)")
    g.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="serve TLS with this PEM certificate (with --tls-key)")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    g.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="PEM CA certificate trusted for peers: verifies the services this one "
                        "calls; with --tls-client-auth, the certificates its clients present")
    g.add_argument("--tls-client-auth", action="store_true",
                   help="mutual TLS: refuse clients without a certificate signed by --tls-ca")
    return g


def server_tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    """The `ServerTLS` the flags ask for; `AuthConfigError` for an incomplete set."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise AuthConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_auth and not (args.tls_ca and args.tls_cert):
        raise AuthConfigError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
    if not args.tls_cert:
        return None
    tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_ca if args.tls_client_auth else None)
    tls.credentials()  # unreadable files fail at start, with their names
    return tls


def open_warning(service: str, open_parts: list[str]) -> str | None:
    """The one start-up line saying what of `service` anyone who reaches it may use."""
    if not open_parts:
        return None
    return f"{service} is unauthenticated: {'; '.join(open_parts)}"


# --- client side --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents: a key (sent as ``authorization: Bearer KEY`` on every call) and,
    for TLS, the CA that signed the server's certificate (plus a client certificate and key for
    mutual TLS). Nothing set: a plaintext channel without a key, as before."""

    key: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None:
            _check_key(self.key, "key")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise AuthConfigError("a client certificate and its key go together")
        if self.tls_cert and not self.tls_ca:
            raise AuthConfigError("a client certificate needs the server's CA (tls_ca) too")

    @classmethod
    def from_files(cls, key_file: str | None = None, tls_ca: str | None = None,
                   tls_cert: str | None = None, tls_key: str | None = None) -> ClientCredentials:
        creds = cls(read_key(key_file) if key_file else None, tls_ca, tls_cert, tls_key)
        creds.channel_credentials()  # unreadable files fail now, with their names
        return creds

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the key (empty without one)."""
        return ((AUTH_KEY, BEARER + self.key),) if self.key else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "TLS CA"),
            private_key=_read(self.tls_key, "TLS key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "TLS certificate") if self.tls_cert else None)

    def aio_channel(self, address: str, options: Sequence = ()) -> grpc.aio.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, creds, options=list(options))

    def channel(self, address: str, options: Sequence = ()) -> grpc.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, creds, options=list(options))


def add_client_arguments(parser, key_flag: str = "--key-file", tls_prefix: str = "--",
                         title: str = "security", key_help: str = "") -> None:
    """`key_flag` and {tls_prefix}tls-ca, -tls-cert, -tls-key: what a client presents."""
    g = parser.add_argument_group(title)
    g.add_argument(key_flag, default=None, metavar="FILE",
                   help=key_help or "send the key in FILE (its first entry; of a name:key line, "
                                    "the key) as 'authorization: Bearer KEY'")
    g.add_argument(f"{tls_prefix}tls-ca", default=None, metavar="FILE",
                   help="connect over TLS, verifying the server against this PEM CA")
    g.add_argument(f"{tls_prefix}tls-cert", default=None, metavar="FILE",
                   help="a client certificate for mutual TLS (with its key)")
    g.add_argument(f"{tls_prefix}tls-key", default=None, metavar="FILE",
                   help="the client certificate's PEM private key")


def client_credentials_from_args(args: argparse.Namespace, key_flag: str = "--key-file",
                                 tls_prefix: str = "--") -> ClientCredentials:
    """The `ClientCredentials` of the flags `add_client_arguments` added."""
    def dest(flag: str) -> str:
        return flag.lstrip("-").replace("-", "_")
    return ClientCredentials.from_files(
        getattr(args, dest(key_flag)), getattr(args, dest(f"{tls_prefix}tls-ca")),
        getattr(args, dest(f"{tls_prefix}tls-cert")), getattr(args, dest(f"{tls_prefix}tls-key")))
