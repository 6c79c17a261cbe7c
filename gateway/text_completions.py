"""Legacy text completions (`POST /v1/completions`): a prompt in, its continuation out, no
chat template.

Each completion is a job of its own with one segment, ended when the segment ends, unless
the request names a session (the body's `session_id`, `nvext.agent_context` or the headers
chat reads): it is then a segment of that session's job. A prompt that starts with the
session's last prompt and the text generated for it continues the job's context (only the
rest is prefilled); any other prompt ends the job and starts a new one. A chat request never
continues a text completion's turn (a text prompt may continue a chat turn: the test is on
the text the job's context holds, special tokens included).

The segment itself runs as a chat `Turn` without tools, so streaming, decoding and the
simulated worker's placeholder tokens are handled in one place.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationError, field_validator

from astraea.client import AstraeaError
from astraea.telemetry import get_logger
from gateway import errors
from gateway.completions import HUMAN, Chats, Turn, session_id_of
from gateway.schemas import NeutralPenalties, NvExt, StreamOptions, validation_error
from gateway.sessions import Session

log = get_logger("astraea.gateway")

JOB_CATEGORY = "completion"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


class CompletionRequest(NeutralPenalties):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: str | None = None
    nvext: NvExt | None = None
    # Accepted, and only at their neutral value.
    echo: bool | None = None
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None
    # Accepted and ignored.
    user: str | None = None

    # What a chat `Turn` reads of its request: no tools (class constants, not fields).
    tools: ClassVar[None] = None
    tool_choice: ClassVar[None] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only one prompt per request is supported (a string, or a list "
                             "of one string)")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported: send false or leave it out")
        return v

    @field_validator("n", "best_of")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError("only 1 is supported: each request is one segment")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def forced_tools(self) -> list:
        return []

    def output_limit(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, fields=CompletionRequest.model_fields) from None


class TextCompletions:
    """Text completions, as one-segment jobs or segments of named sessions."""

    def __init__(self, chats: Chats) -> None:
        self.chats = chats

    async def prepare(self, req: CompletionRequest, headers, owner: str = "") -> Turn:
        chats = self.chats
        if req.model != chats.config.model:
            raise errors.model_not_found(req.model, chats.config.model)
        prompt = req.text()
        named = session_id_of(req, headers)
        if named is None:
            s = Session(f"cmpl-{uuid.uuid4().hex}", explicit=False)  # in no table: one turn
        else:
            s = chats.sessions.find(named, [], owner)
            if s is not None and s.busy:
                raise errors.session_busy(s.session_id)
            if s is None:
                s = chats.sessions.new(named, owner)
        s.busy, s.turn_started, s.last_used = True, False, time.monotonic()
        try:
            await chats.claim(s)
            ids, prompt_tokens = await self._input(s, prompt, named is not None)
            if not ids:
                raise errors.bad_request("the prompt is empty", "prompt")
        except AstraeaError as e:
            chats.sessions.forget_turn(s)
            chats.release(s)
            raise errors.from_grpc(e.code, e.message) from None
        except BaseException:
            chats.release(s)
            raise
        turn = Turn(chats, req, s, [], [], prompt, ids, prompt_tokens, False,  # type: ignore[arg-type]
                    next_tool_category=HUMAN if named is not None else None)
        turn.id = f"cmpl-{uuid.uuid4().hex}"
        return turn

    async def _input(self, s: Session, prompt: str, in_session: bool) -> tuple[list[int], int]:
        """(the token ids to send, the whole prompt's tokens), the session's job ready."""
        chats = self.chats
        before = s.prompt_text + s.generated_text
        if in_session and s.job_id is not None and before and \
                not s.context_differs and prompt.startswith(before) and len(prompt) > len(before):
            await chats.end_tool_wait(s)  # a job gone meanwhile: whole prompt, below
            if s.job_id is not None:
                ids = chats.tokenizer.encode(prompt[len(before):])
                return ids, s.context_tokens + len(ids)
        if s.job_id is not None:
            await chats.drop_job(s, "the prompt does not continue the session")
        s.job_id = await chats.client.start_job(category=JOB_CATEGORY)
        # As vLLM's /v1/completions (add_special_tokens defaults to true there): the
        # tokenizer's own special tokens, a BOS for most models, start the prompt.
        ids = chats.tokenizer.encode(prompt, special=True)
        return ids, len(ids)

    async def run(self, turn: Turn) -> AsyncIterator[str]:
        """The segment's text as it streams; the turn is finished when the stream is."""
        try:
            async with contextlib.aclosing(turn.run()) as deltas:
                async for delta in deltas:
                    yield delta
        except BaseException:
            await self._end(turn, failed=True)
            raise
        await self.chats.wrap_up(turn, self.wrap_up(turn))  # done even if the client leaves now

    def wrap_up(self, turn: Turn):
        """What ends `turn` after a streamed segment whose client left (`Chats.settle`)."""
        return lambda: self._end(turn, failed=False)

    async def _end(self, turn: Turn, failed: bool) -> None:
        chats, s = self.chats, turn.session
        turn._finishing = True
        try:
            if not chats.sessions.holds(s):  # a one-segment job: done
                if s.job_id is not None:
                    with contextlib.suppress(AstraeaError):
                        await chats.client.end_job(s.job_id)
                return
            if failed:
                return  # Turn.run has forgotten the job
            s.n_messages, s.prompt_text = 0, turn.prompt_text
            s.generated_text = turn.generated_text()
            s.context_tokens = turn.prompt_tokens + len(turn.generated)
            chats.sessions.drop_key(s)
            s.context_differs = not turn.text_is_tokens
            try:
                await chats.client.report_tool_start(s.job_id, HUMAN)
                s.tool_started = True
            except AstraeaError as e:
                log.warning("tool start not recorded; the session starts over", error=str(e),
                            session_id=s.session_id)
                chats.sessions.forget_turn(s)
        finally:
            turn._release()
        await chats.flush_shared()


def completion_body(turn: Turn, text: str, finish_reason: str | None, usage: bool) -> dict:
    """A `text_completion` object (whole, or one streamed chunk)."""
    body = {"id": turn.id, "object": "text_completion", "created": turn.created,
            "model": turn.req.model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}
    if usage:
        body["usage"] = turn.usage()
    return body


async def stream_chunks(completions: TextCompletions, turn: Turn) -> AsyncIterator[bytes]:
    """The completion as server-sent `text_completion` chunks, a last one with the finish
    reason, usage when asked for, then `[DONE]`."""
    try:
        async with contextlib.aclosing(completions.run(turn)) as deltas:
            async for delta in deltas:
                yield _sse(completion_body(turn, delta, None, False))
    except AstraeaError as e:
        yield _sse(errors.from_grpc(e.code, e.message).body())
        return
    yield _sse(completion_body(turn, "", turn.finish_reason, False))
    opts = turn.req.stream_options
    if opts is not None and opts.include_usage:
        yield _sse({**completion_body(turn, "", None, True), "choices": []})
    yield b"data: [DONE]\n\n"


def _sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
