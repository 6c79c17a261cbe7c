"""The FastAPI app: /v1/chat/completions, /v1/responses and /v1/completions (whole or
streamed as server-sent events), /v1/models, /health, API keys, the body-size limit, and
every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from astraea.client import AstraeaError, AsyncAgentClient
from astraea.telemetry import get_logger
from gateway import errors, response_schemas, schemas, text_completions
from gateway.chat import ChatTokenizer
from gateway.completions import Chats, Turn
from gateway.config import GatewayConfig
from gateway.response_store import MemoryResponseStore, ResponseStore
from gateway.responses import Responses, stream_events

log = get_logger("astraea.gateway")


def _authorized(config: GatewayConfig, request: Request) -> None:
    if not config.api_keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.unauthorized("Missing API key: send it as 'Authorization: Bearer KEY'.")
    if not any(secrets.compare_digest(key.strip(), k) for k in config.api_keys):
        raise errors.unauthorized("Incorrect API key provided.")


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


async def _stream(turn: Turn) -> AsyncIterator[bytes]:
    yield _sse(_chunk(turn, {"role": "assistant", "content": ""}))
    try:
        async for delta in turn.run():
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
    await turn.finish()
    yield _sse(_chunk(turn, {}, turn.finish_reason))
    opts = turn.req.stream_options
    if opts is not None and opts.include_usage:
        yield _sse({"id": turn.id, "object": "chat.completion.chunk", "created": turn.created,
                    "model": turn.req.model, "choices": [], "usage": turn.usage()})
    yield b"data: [DONE]\n\n"


def create_app(config: GatewayConfig, client: AsyncAgentClient,
               tokenizer: ChatTokenizer, reap: bool = True,
               store: ResponseStore | None = None) -> FastAPI:
    """The gateway's app over `client` (its channel is the caller's to close); Responses API
    responses are kept in `store` (default: the newest ones in memory)."""
    chats = Chats(config, client, tokenizer)
    responses = Responses(chats, store if store is not None else MemoryResponseStore())
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
        _authorized(config, request)
        req = schemas.parse(await _body(config, request))
        turn = await chats.prepare(req, request.headers)
        headers = {"X-Session-ID": turn.session.session_id,
                   "X-Astraea-Job-ID": turn.session.job_id or ""}
        if req.stream:
            return StreamingResponse(_stream(turn), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
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
        _authorized(config, request)
        req = response_schemas.parse(await _body(config, request))
        rt = await responses.prepare(req, request.headers)
        if req.stream:
            return StreamingResponse(stream_events(rt), media_type="text/event-stream",
                                     headers={**rt.headers(), "Cache-Control": "no-cache"})
        body = await responses.run(rt)
        return JSONResponse(body, headers=rt.headers())

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> dict:
        _authorized(config, request)
        return responses.get(response_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorized(config, request)
        req = text_completions.parse(await _body(config, request))
        turn = await texts.prepare(req, request.headers)
        headers = {"X-Astraea-Job-ID": turn.session.job_id or ""}
        if turn.session.session_id in chats.sessions.by_id:  # else a one-segment job
            headers["X-Session-ID"] = turn.session.session_id
        if req.stream:
            return StreamingResponse(text_completions.stream_chunks(texts, turn),
                                     media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        try:
            async for _ in texts.run(turn):
                pass
        except AstraeaError as e:
            raise errors.from_grpc(e.code, e.message) from None
        body = text_completions.completion_body(turn, turn.text, turn.finish_reason, True)
        return JSONResponse(body, headers=headers)

    return app
