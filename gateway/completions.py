"""One Chat Completions request as one segment of its session's job.

`Chats.prepare` finds or opens the session and works out the segment's input; `Turn.run`
streams the segment and yields text deltas, then `Turn.finish` ends the turn: the reply goes
into the session and the job enters its API wait (ReportToolCall START, category the first
tool the model called, or "human"); the next request of the session reports its END.

Continuing a session (see docs/design.md, "The OpenAI gateway"). The job's context holds the
previous prompt's tokens and the tokens the model generated. A new request continues it only
when its messages are the previous request's plus the reply as returned plus new ones, and
its rendered prompt starts with the previous prompt and the re-rendered reply. The model's
own tokens then stand for its reply (re-tokenizing the reply's text often gives other ids);
the template's text after the reply (an end-of-turn the model did not generate, when the
re-rendered reply starts with the generated text) and the new messages are tokenized and sent
as the segment's input. Anything else starts a new job with the whole prompt: the old job is
ended first, so nothing is answered from a context that differs from the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from astraea.client import AstraeaError, AsyncAgentClient, FinishReason
from astraea.telemetry import get_logger
from gateway import errors
from gateway.chat import (
    ChatTokenizer,
    ParsedToolCall,
    parse_forced_call,
    parse_tool_calls,
    template_message,
)
from gateway.config import GatewayConfig
from gateway.schemas import ChatRequest, check_tool_messages
from gateway.sessions import SESSION_HEADERS, Session, SessionTable, prefix_keys
from gateway.shared_sessions import SharedSessions

log = get_logger("astraea.gateway")

JOB_CATEGORY = "chat"
HUMAN = "human"  # the API wait's category when the reply awaits a person, not a tool

__all__ = ["Chats", "Turn"]


def session_id_of(req: ChatRequest, headers) -> str | None:
    """The session a request names, from the first place that has one."""
    if req.session_id:
        return req.session_id
    if headers.get("x-session-id"):
        return headers["x-session-id"]
    ctx = req.nvext.agent_context if req.nvext else None
    if ctx is not None and (ctx.session_id or ctx.trajectory_id):
        return ctx.session_id or ctx.trajectory_id
    for h in SESSION_HEADERS[1:]:
        if headers.get(h):
            return headers[h]
    return None


@dataclass
class Turn:
    """One request on its session, from its input to its reply."""

    chats: Chats
    req: ChatRequest
    session: Session
    messages: list[dict]
    keys: list[str]
    prompt_text: str
    input_ids: list[int]
    prompt_tokens: int  # the whole prompt, in the job's tokens
    close: bool  # nvext.session_control close: end the session after this reply
    json_schema: str | None = None  # what decoding must match (a forced call, response_format)
    # The segment's hint to the scheduler: the API wait its end starts (None: the job's last).
    next_tool_category: str | None = HUMAN
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    prefill_tokens: int | None = None
    _placeholders: bool = False
    # The turn holds its session until `_release` (exactly once: after that the session may
    # be another turn's); `_ran`: the segment ended; `_finishing`: the wrap-up has begun.
    _held: bool = True
    _ran: bool = False
    _finishing: bool = False
    # Whether the reply's text is all its tokens say: not when a stop string cut the text but
    # not the tokens (the job's context then holds text the next request will not).
    _text_is_tokens: bool = True

    @property
    def buffered(self) -> bool:
        """With tools, text may be a tool call: it is sent once the segment has ended."""
        return bool(self.req.tools) and self.req.tool_choice != "none"

    def usage(self) -> dict:
        cached = max(0, self.prompt_tokens - (self.prefill_tokens or 0)) \
            if self.prefill_tokens is not None else 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.generated),
                "total_tokens": self.prompt_tokens + len(self.generated),
                "prompt_tokens_details": {"cached_tokens": cached}}

    def generated_text(self) -> str:
        """The reply's tokens as text, special tokens kept: what the job's context holds
        (less the bytes of a character the budget cut, left out of the text too)."""
        if self._placeholders:
            return self.text
        return _incomplete_end(self.chats.tokenizer.decode(self.generated,
                                                           skip_special=False))[0]

    @property
    def text_is_tokens(self) -> bool:
        return self._text_is_tokens

    def _delta(self, ids: list[int], worker_text: str) -> str:
        """New text for these ids: the worker's, or (placeholder ids of a simulated worker,
        which come with no text) decoded here."""
        tok = self.chats.tokenizer
        if not worker_text and not tok.in_vocab(ids):
            self._placeholders = True
        if not self._placeholders:
            return worker_text
        full = tok.decode(self.generated)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""  # an incomplete character: wait for the next token
        return full[len(self.text):]

    async def run(self) -> AsyncIterator[str]:
        """Run the segment, yielding its text as it arrives (nothing while `buffered`)."""
        chats, s, r = self.chats, self.session, self.req
        s.turn_started = True
        sampling = {"top_p": r.top_p, "seed": r.seed, "stop": r.stops(), **_hints(r)}
        if self.json_schema is not None:
            sampling["json_schema"] = self.json_schema
        stream = chats.client.stream_segment(
            s.job_id, prompt_token_ids=self.input_ids, max_tokens=r.output_limit(),
            temperature=r.temperature, next_tool_category=self.next_tool_category, **sampling)
        # A reply never ends in an incomplete character, as in vLLM's detokenizer: a trailing
        # U+FFFD (bytes of a character the budget cut) waits for text after it, and is
        # dropped when none comes.
        tail = ""
        try:
            # Closed with us (aclosing): the RunSegment call is cancelled at once, not when
            # the garbage collector gets to it.
            async with contextlib.aclosing(stream.__aiter__()) as chunks:
                async for chunk in chunks:
                    self.generated.extend(chunk.token_ids)
                    delta = self._delta(list(chunk.token_ids), chunk.text)
                    if delta:
                        delta, tail = _incomplete_end(tail + delta)
                        if delta:
                            self.text += delta
                            if not self.buffered:
                                yield delta
        except BaseException:
            # Cancelled (the HTTP client went away) or failed: the control plane ends the job
            # when its RunSegment call goes, which frees the worker's KV.
            if self._held:
                chats.sessions.forget_turn(s)
                self._release()
            raise
        self._ran = True
        if not self.text and not tail and self.generated:
            # No text came for any token: placeholders all inside the vocabulary by chance.
            self._placeholders = True
        if self._placeholders:  # what an incomplete character held back, as it decodes
            # (all of it: a simulated worker's placeholders are no model's bytes, and a stack
            # without a model still answers with text)
            full = self.chats.tokenizer.decode(self.generated)
            if full.startswith(self.text) and len(full) > len(self.text):
                rest = full[len(self.text):]
                self.text = full
                if not self.buffered:
                    yield rest
        result = stream.result
        if not self._placeholders:
            full = self.chats.tokenizer.decode(self.generated)
            # Still the tokens' text when the budget only cut a last character: the job's
            # context then goes on from those bytes, as it did before they were left out.
            cut = result.finish_reason is not FinishReason.STOP and \
                full.startswith(self.text) and not _incomplete_end(full[len(self.text):])[0]
            if full != self.text and not cut:
                self._text_is_tokens = False
        self.prefill_tokens = result.timings.prefill_tokens if result.timings else None
        if r.forced_tools():
            # Decoding followed the call's schema: the whole text is the call.
            self.tool_calls = parse_forced_call(self.text)
            if self.tool_calls:
                self.text = ""
        elif r.tools and r.tool_choice != "none":
            content, self.tool_calls = parse_tool_calls(self.text)
            if self.tool_calls:
                self.text = content
        if self.tool_calls:
            self.finish_reason = "tool_calls"
        elif result.finish_reason is FinishReason.STOP:
            self.finish_reason = "stop"
        else:  # the token budget ran out (TOOL_CALL: our hint's reading of that end)
            self.finish_reason = "length"

    def reply(self) -> dict:
        # As OpenAI and vLLM: null only beside tool calls; an empty reply is "".
        msg: dict = {"role": "assistant",
                     "content": self.text if self.text or not self.tool_calls else None}
        if self.tool_calls:
            msg["tool_calls"] = [c.as_openai() for c in self.tool_calls]
        return msg

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.chats.release(self.session)

    async def finish(self) -> None:
        """The reply is sent: record it in the session and start its API wait (or end the
        session when asked to)."""
        chats, s = self.chats, self.session
        self._finishing = True
        try:
            if self.close:
                await chats.end_session(s, "closed by the client")
                return
            reply = self.reply()
            s.n_messages = len(self.messages)
            s.prompt_text = self.prompt_text
            s.generated_text = self.generated_text()
            s.context_tokens = self.prompt_tokens + len(self.generated)
            keys = prefix_keys([*self.messages, template_message_dict(reply)], self.req_tools())
            chats.sessions.turn_ended(s, keys[-1])
            if not self._text_is_tokens:
                s.context_differs = True
            category = self.wait_category()
            try:
                await chats.client.report_tool_start(s.job_id, category)
                s.tool_started = True
            except AstraeaError as e:  # the job is gone (e.g. its worker died)
                log.warning("tool start not recorded; the session starts over", error=str(e),
                            session_id=s.session_id)
                chats.sessions.forget_turn(s)
        finally:
            self._release()
        await chats.flush_shared()  # the next turn may come to another gateway at once

    def req_tools(self) -> list[dict] | None:
        return _tools(self.req)

    def wait_category(self) -> str:
        """The API wait's category: the client's hint, else the function the model called,
        else a person's reply."""
        hint = getattr(self.req, "astraea", None)
        if hint is not None and hint.next_tool_category:
            return hint.next_tool_category
        return self.tool_calls[0].name if self.tool_calls else HUMAN


class Chats:
    """The gateway's sessions and the calls that run them."""

    def __init__(self, config: GatewayConfig, client: AsyncAgentClient,
                 tokenizer: ChatTokenizer, shared: SharedSessions | None = None) -> None:
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.sessions = SessionTable()
        # Named sessions in the durable store (None: in this process only).
        self.shared = shared
        self._wrapping_up: set[asyncio.Task] = set()  # wrap-ups no request waits for

    async def prepare(self, req: ChatRequest, headers, owner: str = "") -> Turn:
        """The request's turn on its session (found, continued or opened), its job ready.
        `owner`: the API key's owner id; another owner's sessions are never found."""
        if req.model != self.config.model:
            raise errors.model_not_found(req.model, self.config.model)
        check_tool_messages(req.messages)
        schema = _json_schema(req)
        messages = [template_message(m) for m in req.messages]
        tools = _tools(req)
        try:
            prompt_text = self.tokenizer.render(messages, tools, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (e.g. roles it does not allow)
            raise errors.bad_request(f"messages cannot be rendered by the model's chat "
                                     f"template: {e}", "messages") from None
        keys = prefix_keys(messages, tools)
        named = session_id_of(req, headers)
        close = bool(req.nvext and req.nvext.session_control
                     and req.nvext.session_control.action == "close")
        s = self.sessions.find(named, keys, owner)
        if s is not None and s.busy:
            if named is not None:
                raise errors.session_busy(s.session_id)
            s = None  # an unnamed fork of a conversation being answered: a session of its own
        if s is None:
            s = self.sessions.new(named, owner)
        s.busy = True  # no await between the lookup and here: one request per session
        s.turn_started = False
        s.last_used = time.monotonic()
        try:
            await self.claim(s)
            suffix = self._continuation(s, messages, tools, keys, prompt_text)
            if suffix is not None and not await self.end_tool_wait(s):
                suffix = None
            if suffix is not None:
                ids = self.tokenizer.encode(suffix)
                prompt_tokens = s.context_tokens + len(ids)
            else:
                if s.job_id is not None:
                    await self.drop_job(s, "the prompt does not continue the session")
                hint = req.astraea.job_category if req.astraea is not None else None
                s.job_id = await self.client.start_job(category=hint or JOB_CATEGORY)
                ids = self.tokenizer.encode(prompt_text)
                prompt_tokens = len(ids)
            if not ids:
                raise errors.bad_request("the rendered prompt is empty", "messages")
        except AstraeaError as e:
            self.sessions.forget_turn(s)
            self.release(s)
            raise errors.from_grpc(e.code, e.message) from None
        except BaseException:
            self.release(s)
            raise
        turn = Turn(self, req, s, messages, keys, prompt_text, ids, prompt_tokens, close,
                    schema)
        if req.astraea is not None and req.astraea.next_tool_category:
            turn.next_tool_category = req.astraea.next_tool_category
        return turn

    async def claim(self, s: Session) -> None:
        """A named session's turn starts: with a shared store, hold it there and load what
        its job holds (409 when a request on any gateway holds it)."""
        if self.shared is not None and s.explicit:
            s.shared = True
            await self.shared.claim(s, self.sessions)

    def settle(self, turn: Turn, wrap_up: Callable[[], Awaitable[None]]) -> None:
        """A streamed turn's response is over, however it ended (the client may have left at
        any point): the session is never left held. A turn whose segment ended but whose
        wrap-up never ran gets `wrap_up` in the background (the reply is known: it is
        recorded, and stored, as if sent); one whose segment never ran frees the session as
        it was. A no-op once the turn has released it or begun its wrap-up."""
        if not turn._held or turn._finishing:
            return
        if turn._ran:
            turn._finishing = True
            task = asyncio.get_running_loop().create_task(self._wrap_up(turn, wrap_up))
            self._wrapping_up.add(task)
            task.add_done_callback(self._wrapping_up.discard)
            return
        if turn.session.turn_started:  # stopped mid-segment: what the job holds is unknown
            self.sessions.forget_turn(turn.session)
        turn._release()

    async def wrap_up(self, turn: Turn, wrap_up: Callable[[], Awaitable[None]]) -> None:
        """Run a turn's wrap-up (its segment has ended) to its end even when the client leaves
        meanwhile: the cancellation stops this wait, not the wrap-up, which goes on as a task
        of its own (else the reply would be lost to the session, the response never stored)."""
        turn._finishing = True  # before the task runs: `settle` must not start another
        task = asyncio.get_running_loop().create_task(wrap_up())
        self._wrapping_up.add(task)
        task.add_done_callback(self._wrapping_up.discard)
        task.add_done_callback(_retrieved)
        await asyncio.shield(task)

    async def _wrap_up(self, turn: Turn, wrap_up: Callable[[], Awaitable[None]]) -> None:
        try:
            await wrap_up()
        except Exception as e:  # nobody to answer: logged; the turn released its session
            log.warning("a turn whose client left was not wrapped up", error=str(e),
                        session_id=turn.session.session_id)
        finally:
            turn._release()

    def release(self, s: Session) -> None:
        """The session's turn is over (or never ran): free it, here and in the store."""
        s.busy = False
        s.last_used = time.monotonic()
        if self.shared is not None:
            self.shared.release(s)

    async def flush_shared(self) -> None:
        if self.shared is not None:
            await self.shared.flush()

    async def end_tool_wait(self, s: Session) -> bool:
        """A request continuing the session ends the API wait its last reply began
        (ReportToolCall END). False when the control plane no longer knows the job (it
        restarted): the session then starts over with the whole prompt."""
        if not s.tool_started:
            return True
        s.tool_started = False
        try:
            await self.client.report_tool_end(s.job_id)
        except AstraeaError as e:
            if e.code is not grpc.StatusCode.NOT_FOUND:
                raise
            self.sessions.forget_turn(s)
            return False
        return True

    def _continuation(self, s: Session, messages: list[dict], tools, keys: list[str],
                      prompt_text: str) -> str | None:
        """The text to send after the job's context when the request continues the session's
        last turn (see the module docstring), else None."""
        if s.job_id is None or s.context_differs or not s.continues(keys):
            return None
        through_reply = self.tokenizer.render(messages[:s.n_messages + 1], tools,
                                              add_generation_prompt=False)
        if not (through_reply.startswith(s.prompt_text) and prompt_text.startswith(through_reply)):
            return None
        rendered_reply = through_reply[len(s.prompt_text):]
        rest = rendered_reply[len(s.generated_text):] \
            if rendered_reply.startswith(s.generated_text) else ""
        return rest + prompt_text[len(through_reply):]

    async def drop_job(self, s: Session, why: str) -> None:
        """End the session's job (if any); the session stays, with no turn to continue."""
        job_id = s.job_id
        self.sessions.forget_turn(s)
        if job_id is None:
            return
        try:
            await self.client.end_job(job_id)
        except AstraeaError as e:
            if e.code is not grpc.StatusCode.NOT_FOUND:
                log.warning("could not end a session's job", job_id=job_id, error=str(e))
        log.info("session job ended", session_id=s.session_id, job_id=job_id, why=why)

    async def end_session(self, s: Session, why: str) -> None:
        await self.drop_job(s, why)
        self.sessions.remove(s)
        if self.shared is not None:
            await self.shared.delete(s)

    async def reap_idle(self, now: float | None = None) -> int:
        """End the sessions idle for longer than the configured timeout; how many. A session
        busy with a turn whose segment never started (a streamed response whose client left
        before its body began) counts as idle too."""
        idle = self.sessions.idle(self.config.session_idle_s, now)
        ended = 0
        for s in idle:
            if s.shared and not s.busy:
                self.sessions.remove(s)  # only the copy here: idle is decided in the store
                continue
            await self.end_session(s, "idle")
            ended += 1
        if self.shared is not None:
            # Idle on every gateway (or held by a gateway that died): whoever claims it first
            # ends its job.
            for s in await self.shared.take_stale(self.config.session_idle_s):
                local = self.sessions.get(s.owner, s.session_id)
                if local is not None and not local.busy:
                    self.sessions.remove(local)
                await self.end_session(s, "idle")
                ended += 1
        return ended

    async def reap_forever(self) -> None:
        period = max(0.05, min(5.0, self.config.session_idle_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                if self.shared is not None:
                    self.shared.renew([s for s in self.sessions.by_id.values() if s.busy])
                await self.reap_idle()
            except Exception as e:  # a control-plane (or store) hiccup must not stop it
                log.warning("idle sessions not reaped", error=str(e))

    async def close(self) -> None:
        """End every session (the gateway is stopping): their jobs' KV is freed now. Shared
        sessions stay, with their jobs: another gateway, or this one restarted, goes on."""
        # No retrying now: a control plane that is away (stopping with us, say) would hold
        # the gateway's exit for the whole retry window; its job timeout ends these jobs.
        self.client.retry = None
        for s in list(self.sessions.by_id.values()):
            if not s.busy and not s.shared:
                await self.end_session(s, "gateway stopping")


def _retrieved(task: asyncio.Task) -> None:
    # A wrap-up whose waiter was cancelled: its error has no one to go to but the log.
    if not task.cancelled() and task.exception() is not None:
        log.warning("a turn's wrap-up failed", error=str(task.exception()))


def tool_call_schema(tools) -> dict:
    """The schema of one call of one of `tools`: {"name": ..., "arguments": {...}}."""
    options = [{"type": "object", "additionalProperties": False,
                "required": ["name", "arguments"],
                "properties": {"name": {"const": t.function.name},
                               "arguments": t.function.parameters or {"type": "object"}}}
               for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def template_message_dict(reply: dict) -> dict:
    """The reply as it will come back in the next request, in template form."""
    calls = reply.get("tool_calls")
    return {"role": "assistant", "content": reply.get("content") or "",
            "tool_calls": [{"id": c["id"], "type": "function",
                            "function": {"name": c["function"]["name"],
                                         "arguments": c["function"]["arguments"]}}
                           for c in calls] if calls else None}


def _incomplete_end(text: str) -> tuple[str, str]:
    """(`text` less its trailing U+FFFD characters, those characters)."""
    kept = text.rstrip("\ufffd")
    return kept, text[len(kept):]


def _hints(req) -> dict:
    """The request's hints for the scheduler: Dynamo's nvext.agent_hints.osl (expected output
    tokens) and the astraea object's expected_tool_s, where given."""
    out = {}
    nvext = getattr(req, "nvext", None)
    if nvext is not None and nvext.agent_hints is not None and nvext.agent_hints.osl:
        out["expected_output_tokens"] = nvext.agent_hints.osl
    ours = getattr(req, "astraea", None)
    if ours is not None and ours.expected_tool_s is not None:
        out["expected_tool_s"] = ours.expected_tool_s
    return out


def _tools(req: ChatRequest) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def _json_schema(req: ChatRequest) -> str | None:
    """The JSON schema the output must match: a forced tool call's, or response_format's."""
    forced = req.forced_tools()
    if forced:
        return json.dumps(tool_call_schema(forced))
    f = req.response_format
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return json.dumps({"type": "object"})
    if f.json_schema is None or f.json_schema.schema_ is None:
        raise errors.bad_request("response_format.json_schema.schema is required for "
                                 "type json_schema", "response_format.json_schema.schema")
    return json.dumps(f.json_schema.schema_)
