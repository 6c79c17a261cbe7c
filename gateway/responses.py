"""The Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) over the chat machinery.

A response is one chat turn: its input items become Chat Completions messages after the
conversation of `previous_response_id` (kept in the `ResponseStore`), and the turn runs as
a segment of a session's job exactly as a chat request does (`gateway.completions`). A turn
that continues a stored response names that response's session when the session's last turn
is still that response, so the job's context is resumed and only the new items are
prefilled; otherwise (the session moved on: a fork, or its job is gone) the session is found
by its messages like any chat request, or a new one is opened.

With a durable store (`--state-dir` / `--database`) responses are kept there and every turn
runs in a named session (one the client names, else a new one): the store keeps it, so a
chain goes on in its job on any gateway on the same store (gateway/shared_sessions.py).

As at OpenAI, `instructions` are not carried over from the previous response: each request
sends its own (the same instructions on every turn keep the prompt a continuation).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from astraea.client import AstraeaError
from astraea.store import StoreError
from gateway import errors, response_schemas, schemas
from gateway.completions import Chats, Turn
from gateway.response_schemas import NamedFunction, ResponsesRequest
from gateway.response_store import MemoryResponseStore, ResponseStore, StoredResponse

__all__ = ["Responses", "ResponseTurn", "stream_events"]


def previous_not_found(response_id: str) -> errors.ApiError:
    return errors.ApiError(404, f"Previous response with id {response_id!r} not found.",
                           param="previous_response_id", code="previous_response_not_found")


def response_not_found(response_id: str) -> errors.ApiError:
    return errors.ApiError(404, f"No response found with id {response_id!r}.",
                           "not_found_error", param="response_id", code="response_not_found")


@dataclass
class ResponseTurn:
    """One Responses API request and the chat turn that answers it."""

    responses: Responses
    req: ResponsesRequest
    turn: Turn
    history: list[dict]  # the conversation before the reply, without instructions
    owner: str = ""  # the API key's owner id: the only one who finds it stored
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    status: str = "in_progress"

    def output(self) -> list[dict]:
        """The output items of the finished turn: its text as a message (also when there is
        neither text nor a call), then one item per function call."""
        t = self.turn
        items: list[dict] = []
        if t.text or not t.tool_calls:
            items.append(self.message_item(t.text, self.status))
        items += [self.call_item(i, "completed") for i in range(len(t.tool_calls))]
        return items

    def message_item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [_text_part(text)]
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}

    def call_item(self, i: int, status: str, arguments: str | None = None) -> dict:
        c = self.turn.tool_calls[i]
        return {"id": f"fc_{c.id.removeprefix('call_')}", "type": "function_call",
                "status": status, "call_id": c.id, "name": c.name,
                "arguments": c.arguments if arguments is None else arguments}

    def usage(self) -> dict:
        u = self.turn.usage()
        return {"input_tokens": u["prompt_tokens"],
                "input_tokens_details": {
                    "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                    "cache_write_tokens": 0},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["total_tokens"]}

    def body(self) -> dict:
        """The response object, in its current state."""
        r, done = self.req, self.status != "in_progress"
        choice = r.tool_choice
        if isinstance(choice, NamedFunction):
            choice = choice.model_dump()
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
            "model": r.model, "output": self.output() if done else [],
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": r.store,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": r.text.model_dump(by_alias=True, exclude_none=True)
            if r.text and r.text.format else {"format": {"type": "text"}},
            "tool_choice": choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in r.tools or []],
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": "disabled",
            "usage": self.usage() if done else None,
            "user": r.user, "metadata": r.metadata or {},
        }

    def headers(self) -> dict[str, str]:
        s = self.turn.session
        return {"X-Session-ID": s.session_id, "X-Astraea-Job-ID": s.job_id or ""}

    async def finish(self) -> None:
        """The turn has run: settle the status, end the turn on its session, store it."""
        t = self.turn
        self.status = "incomplete" if t.finish_reason == "length" else "completed"
        await t.finish()
        if self.req.store:
            s = t.session
            store = self.responses.store
            store.put(StoredResponse(
                self.id, self.body(), [*self.history, t.reply()], s.session_id, s.key,
                self.owner))
            await store.flush()  # durable before the client learns the id


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Responses:
    """Responses API requests, run as chat turns of the gateway's sessions."""

    def __init__(self, chats: Chats, store: ResponseStore) -> None:
        self.chats = chats
        self.store = store

    async def get(self, response_id: str, owner: str = "") -> dict:
        """The stored response; another owner's is unknown (404 word for word)."""
        stored = await self._stored(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        return stored.body

    async def prepare(self, req: ResponsesRequest, headers, owner: str = "") -> ResponseTurn:
        """The request's turn, its session found (or opened) and its job ready; `owner`'s
        (the API key's) responses and sessions only."""
        chats = self.chats
        if req.model != chats.config.model:
            raise errors.model_not_found(req.model, chats.config.model)
        history: list[dict] = []
        session_id = req.session_id
        if req.previous_response_id is not None:
            prev = await self._stored(req.previous_response_id, owner)
            if prev is None:
                raise previous_not_found(req.previous_response_id)
            history = prev.messages
            if chats.shared is not None:
                if session_id is None and prev.session_id is not None and \
                        await chats.shared.continues(owner, prev.session_id, prev.session_key):
                    session_id = prev.session_id
            else:
                s = chats.sessions.get(owner, prev.session_id or "")
                if session_id is None and s is not None and not s.busy and \
                        s.key is not None and s.key == prev.session_key:
                    session_id = prev.session_id
        if session_id is None and chats.shared is not None:
            # A named (so shared) session, that the next response may continue on any gateway.
            session_id = f"sess-{uuid.uuid4().hex}"
        messages = [*history, *response_schemas.input_messages(req, history)]
        chat_req = schemas.parse(response_schemas.chat_body(req, messages, session_id))
        turn = await chats.prepare(chat_req, headers, owner)
        return ResponseTurn(self, req, turn, messages, owner)

    async def _stored(self, response_id: str, owner: str) -> StoredResponse | None:
        """The owner's stored response; a durable store is read off the event loop."""
        if isinstance(self.store, MemoryResponseStore):
            return self.store.get(response_id, owner)
        try:
            return await asyncio.to_thread(self.store.get, response_id, owner)
        except StoreError as e:
            raise errors.ApiError(503, f"the gateway's response store failed: {e}",
                                  "service_unavailable",
                                  code="state_store_unavailable") from None

    async def run(self, rt: ResponseTurn) -> dict:
        """Run the turn to its end; the finished response object."""
        try:
            async for _ in rt.turn.run():
                pass
        except AstraeaError as e:
            raise errors.from_grpc(e.code, e.message) from None
        await rt.finish()
        return rt.body()


def _event(seq: itertools.count, type_: str, **fields) -> bytes:
    data = json.dumps({"type": type_, "sequence_number": next(seq), **fields},
                      separators=(",", ":"))
    return f"event: {type_}\ndata: {data}\n\n".encode()


async def stream_events(rt: ResponseTurn) -> AsyncIterator[bytes]:
    """The turn as the Responses API's server-sent events: the response created, each output
    item opened, its text or arguments, each item done, and the response completed (or
    incomplete, at the token limit). With tools, text may be a call, so the items come
    once the segment has ended."""
    seq = itertools.count()
    yield _event(seq, "response.created", response=rt.body())
    yield _event(seq, "response.in_progress", response=rt.body())
    t, opened, text = rt.turn, False, ""
    ids = {"item_id": rt.message_id, "output_index": 0}
    try:
        async with contextlib.aclosing(t.run()) as deltas:
            async for delta in deltas:
                if not opened:
                    opened = True
                    for ev in _open_message(seq, rt):
                        yield ev
                text += delta
                yield _event(seq, "response.output_text.delta", **ids, content_index=0,
                             delta=delta, logprobs=[])
    except AstraeaError as e:
        err = errors.from_grpc(e.code, e.message)
        rt.status = "failed"
        body = {**rt.body(), "error": {"code": err.code or "server_error",
                                       "message": err.message}}
        yield _event(seq, "response.failed", response=body)
        return
    status = "incomplete" if t.finish_reason == "length" else "completed"
    index = 0
    if t.text or not t.tool_calls:
        if not opened:
            for ev in _open_message(seq, rt):
                yield ev
        if t.text != text:  # buffered (tools), or a tool call's text taken out
            yield _event(seq, "response.output_text.delta", **ids, content_index=0,
                         delta=t.text, logprobs=[])
        yield _event(seq, "response.output_text.done", **ids, content_index=0,
                     text=t.text, logprobs=[])
        yield _event(seq, "response.content_part.done", **ids, content_index=0,
                     part=_text_part(t.text))
        yield _event(seq, "response.output_item.done", output_index=0,
                     item=rt.message_item(t.text, status))
        index = 1
    for i, c in enumerate(t.tool_calls):
        item_id = rt.call_item(i, "completed")["id"]
        yield _event(seq, "response.output_item.added", output_index=index + i,
                     item=rt.call_item(i, "in_progress", ""))
        yield _event(seq, "response.function_call_arguments.delta", item_id=item_id,
                     output_index=index + i, delta=c.arguments)
        yield _event(seq, "response.function_call_arguments.done", item_id=item_id,
                     output_index=index + i, name=c.name, arguments=c.arguments)
        yield _event(seq, "response.output_item.done", output_index=index + i,
                     item=rt.call_item(i, "completed"))
    await t.chats.wrap_up(t, rt.finish)  # done (stored) even if the client leaves now
    yield _event(seq, f"response.{rt.status}", response=rt.body())


def _open_message(seq: itertools.count, rt: ResponseTurn) -> list[bytes]:
    return [_event(seq, "response.output_item.added", output_index=0,
                   item=rt.message_item(None, "in_progress")),
            _event(seq, "response.content_part.added", item_id=rt.message_id,
                   output_index=0, content_index=0, part=_text_part(""))]
