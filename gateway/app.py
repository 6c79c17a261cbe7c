"""The FastAPI app: /v1/chat/completions, /v1/responses and /v1/completions (whole or
streamed as server-sent events), /v1/models, /health, API keys, the body-size limit, and
every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from astraea.client import AstraeaError, AsyncAgentClient
from astraea.store import Store
from astraea.telemetry import get_logger
from gateway import errors, response_schemas, schemas, text_completions
from gateway.chat import ChatTokenizer
from gateway.completions import Chats, Turn
from gateway.config import GatewayConfig
from gateway.response_store import MemoryResponseStore, ResponseStore, StoreResponseStore
from gateway.responses import Responses, stream_events
from gateway.shared_sessions import SharedSessions

log = get_logger("astraea.gateway")


def _authorized(config: GatewayConfig, request: Request) -> str:
    """The owner id of the request's key ("" when the gateway needs none); 401 without an
    accepted key."""
    if not config.api_keys:
        return ""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.unauthorized("Missing API key: send it as 'Authorization: Bearer KEY'.")
    found = None
    for k, owner in config.api_keys.items():  # every key compared: timing tells nothing
        if secrets.compare_digest(key.strip().encode(), k.encode()):
            found = owner
    if found is None:
        raise errors.unauthorized("Incorrect API key provided.")
    return found


async def _body(config: GatewayConfig, request: Request) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise errors.too_large(config.max_body_bytes)
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check first
        raw += chunk
        if len(raw) > config.max_body_bytes:
            raise errors.too_large(config.max_body_bytes)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.bad_request(f"The request body is not valid JSON: {e}",
                                 code="invalid_json") from None


def _sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _chunk(turn: Turn, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": turn.id, "object": "chat.completion.chunk", "created": turn.created,
            "model": turn.req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}]}


class TurnStream(StreamingResponse):
    """A streamed turn whose session is settled however the response ends: sent whole, or
    the client gone mid-way (the ASGI server then cancels the send, leaving the body where
    it was: it is closed here at once, then `settle` wraps the turn up or frees it)."""

    def __init__(self, content: AsyncIterator[bytes], settle: Callable[[], None],
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache"})
        self._settle = settle

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # closing awaits nothing slow
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            self._settle()


async def _stream(turn: Turn) -> AsyncIterator[bytes]:
    yield _sse(_chunk(turn, {"role": "assistant", "content": ""}))
    try:
        async with contextlib.aclosing(turn.run()) as deltas:
            async for delta in deltas:
                yield _sse(_chunk(turn, {"content": delta}))
    except AstraeaError as e:
        yield _sse(errors.from_grpc(e.code, e.message).body())
        return
    if turn.buffered:
        if turn.text:
            yield _sse(_chunk(turn, {"content": turn.text}))
        if turn.tool_calls:
            yield _sse(_chunk(turn, {"tool_calls": [
                {"index": i, **c.as_openai()} for i, c in enumerate(turn.tool_calls)]}))
    await turn.chats.wrap_up(turn, turn.finish)  # done even if the client leaves now
    yield _sse(_chunk(turn, {}, turn.finish_reason))
    opts = turn.req.stream_options
    if opts is not None and opts.include_usage:
        yield _sse({"id": turn.id, "object": "chat.completion.chunk", "created": turn.created,
                    "model": turn.req.model, "choices": [], "usage": turn.usage()})
    yield b"data: [DONE]\n\n"


def create_app(config: GatewayConfig, client: AsyncAgentClient,
               tokenizer: ChatTokenizer, reap: bool = True,
               store: ResponseStore | None = None, state: Store | None = None) -> FastAPI:
    """The gateway's app over `client` (its channel is the caller's to close); Responses API
    responses are kept in `store` (default: in `state`, the durable store, when given, else
    the newest ones in memory). With `state`, named sessions live there too (shared with
    every gateway on it); the store is the caller's to close."""
    shared = SharedSessions(state) if state is not None else None
    chats = Chats(config, client, tokenizer, shared)
    if store is None:
        store = StoreResponseStore(state, config.response_retention_s) \
            if state is not None else MemoryResponseStore()
    responses = Responses(chats, store)
    texts = text_completions.TextCompletions(chats)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        reaper = asyncio.create_task(chats.reap_forever()) if reap else None
        try:
            yield
        finally:
            if reaper is not None:
                reaper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reaper
            with contextlib.suppress(Exception):
                await chats.close()

    app = FastAPI(title="Astraea gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.chats = chats
    app.state.responses = responses

    @app.exception_handler(errors.ApiError)
    async def _api_error(_request: Request, e: errors.ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, e: RequestValidationError) -> JSONResponse:
        return schemas.validation_error(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return errors.ApiError(e.status_code, str(e.detail), kind).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model, "sessions": len(chats.sessions.by_id)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorized(config, request)
        return {"object": "list", "data": [
            {"id": config.model, "object": "model", "created": config.created_unix_s,
             "owned_by": "astraea"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        owner = _authorized(config, request)
        req = schemas.parse(await _body(config, request))
        turn = await chats.prepare(req, request.headers, owner)
        headers = {"X-Session-ID": turn.session.session_id,
                   "X-Astraea-Job-ID": turn.session.job_id or ""}
        if req.stream:
            return TurnStream(_stream(turn), lambda: chats.settle(turn, turn.finish), headers)
        try:
            async for _ in turn.run():
                pass
        except AstraeaError as e:
            raise errors.from_grpc(e.code, e.message) from None
        await turn.finish()
        body = {"id": turn.id, "object": "chat.completion", "created": turn.created,
                "model": req.model,
                "choices": [{"index": 0, "message": turn.reply(),
                             "finish_reason": turn.finish_reason, "logprobs": None}],
                "usage": turn.usage()}
        return JSONResponse(body, headers=headers)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        owner = _authorized(config, request)
        req = response_schemas.parse(await _body(config, request))
        rt = await responses.prepare(req, request.headers, owner)
        if req.stream:
            return TurnStream(stream_events(rt), lambda: chats.settle(rt.turn, rt.finish),
                              rt.headers())
        body = await responses.run(rt)
        return JSONResponse(body, headers=rt.headers())

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> dict:
        return await responses.get(response_id, _authorized(config, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        owner = _authorized(config, request)
        req = text_completions.parse(await _body(config, request))
        turn = await texts.prepare(req, request.headers, owner)
        headers = {"X-Astraea-Job-ID": turn.session.job_id or ""}
        if chats.sessions.holds(turn.session):  # else a one-segment job
            headers["X-Session-ID"] = turn.session.session_id
        if req.stream:
            return TurnStream(text_completions.stream_chunks(texts, turn),
                              lambda: chats.settle(turn, texts.wrap_up(turn)), headers)
        try:
            async for _ in texts.run(turn):
                pass
        except AstraeaError as e:
            raise errors.from_grpc(e.code, e.message) from None
        body = text_completions.completion_body(turn, turn.text, turn.finish_reason, True)
        return JSONResponse(body, headers=headers)

    return app
