"""Unparseable requests get INVALID_ARGUMENT and one log line, on every service.

gRPC Python runs a method's request deserializer itself: when the bytes are not the message
(`DecodeError`), it logs a traceback and answers UNKNOWN, before any servicer code runs. A
server interceptor sees each method's handler first, so it swaps in a deserializer that
returns an `Unparseable` marker instead of raising, and a behaviour that answers the marker
with INVALID_ARGUMENT. For streamed requests the marker surfaces as `UnparseableRequest` (an
`InvalidRequest`) raised by the request iterator, which the handler turns into its status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc

from astraea.errors import InvalidRequest

log = logging.getLogger("astraea.rpc")


class UnparseableRequest(InvalidRequest):
    """A streamed request message that is not the method's message type."""


@dataclass(frozen=True)
class Unparseable:
    error: str


def _safe(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, or whatever a custom deserializer raises
            return Unparseable(f"{type(e).__name__}: {e}")
    return deserialize


def _message(method: str, bad: Unparseable) -> str:
    return f"request is not a valid {method.rsplit('/', 1)[-1]} request message ({bad.error})"


def _refused(method: str, context, bad: Unparseable) -> str:
    log.warning("unparseable request refused: method=%s peer=%s error=%s", method,
                context.peer(), bad.error)
    return _message(method, bad)


# --- asyncio servers ----------------------------------------------------------------------------
def _aio_checked(method: str, requests: AsyncIterator, context) -> AsyncIterator:
    async def checked():
        async for req in requests:
            if isinstance(req, Unparseable):
                raise UnparseableRequest(_refused(method, context, req))
            yield req
    return checked()


def _aio_guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        # The handler reads the stream and answers the error itself (it knows its protocol).
        inner = handler.stream_unary or handler.stream_stream
        if handler.stream_stream is not None:
            async def stream_stream(requests, context):
                gen = inner(_aio_checked(method, requests, context), context)
                try:
                    async for resp in gen:
                        yield resp
                finally:
                    await gen.aclose()
            return handler._replace(stream_stream=stream_stream,
                                    request_deserializer=_safe(handler.request_deserializer))

        async def stream_unary(requests, context):
            return await inner(_aio_checked(method, requests, context), context)
        return handler._replace(stream_unary=stream_unary,
                                request_deserializer=_safe(handler.request_deserializer))
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, Unparseable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    _refused(method, context, request))
            gen = inner_stream(request, context)
            try:
                async for resp in gen:
                    yield resp
            finally:
                await gen.aclose()
        return handler._replace(unary_stream=unary_stream,
                                request_deserializer=_safe(handler.request_deserializer))
    inner_unary = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Unparseable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                _refused(method, context, request))
        return await inner_unary(request, context)
    return handler._replace(unary_unary=unary_unary,
                            request_deserializer=_safe(handler.request_deserializer))


class AioRequestGuard(grpc.aio.ServerInterceptor):
    """For `grpc.aio.server(interceptors=[AioRequestGuard()])`; servicer methods must be
    coroutines or async generators (as generated servicers on an aio server are)."""

    def __init__(self) -> None:
        # method -> (the service's handler, its guarded copy): built once per method, not
        # per call (the service's handlers are made once, when it is added to the server).
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _aio_guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded


# --- thread-pool servers -----------------------------------------------------------------------
def _sync_checked(method: str, requests: Iterator, context) -> Iterator:
    for req in requests:
        if isinstance(req, Unparseable):
            raise UnparseableRequest(_refused(method, context, req))
        yield req


class RequestGuard(grpc.ServerInterceptor):
    """For `grpc.server(..., interceptors=[RequestGuard()])`."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        safe = _safe(handler.request_deserializer)
        if handler.request_streaming:
            name = "stream_stream" if handler.stream_stream is not None else "stream_unary"
            inner = getattr(handler, name)
            return handler._replace(**{
                name: lambda requests, context: inner(_sync_checked(method, requests, context),
                                                      context),
                "request_deserializer": safe})
        name = "unary_stream" if handler.unary_stream is not None else "unary_unary"
        inner = getattr(handler, name)

        def behaviour(request, context):
            if isinstance(request, Unparseable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refused(method, context, request))
            return inner(request, context)
        return handler._replace(**{name: behaviour, "request_deserializer": safe})
