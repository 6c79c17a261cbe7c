"""Chat sessions: each is one Astraea job, found by the id a client sends or by the messages
it sends again.

A session's key is a hash chain over the canonical form of the messages (tools first, then
one link per message): the key of a session after a turn covers the messages of the request
and the assistant message that answered it. A request continues a session when its messages
start with exactly those; without an id, the live session with the longest such prefix
wins. Rendering and tokenizing the continuation is `gateway.completions`' job.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field

# Where a client may name its session, in the order they are read.
SESSION_HEADERS = ("x-session-id", "x-dynamo-trajectory-id", "x-claude-code-session-id",
                   "session-id")


def canonical(message: dict) -> str:
    """One message as text that is equal exactly when the messages mean the same: content as
    text, tool-call arguments re-serialized when they are JSON, absent and empty alike."""
    calls = []
    for c in message.get("tool_calls") or []:
        args = c["function"]["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        calls.append([c.get("id"), c["function"]["name"], args])
    return json.dumps([message.get("role"), message.get("content") or "",
                       message.get("name") or "", message.get("tool_call_id") or "", calls],
                      sort_keys=True, separators=(",", ":"))


def prefix_keys(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """keys[i]: the key of the first i messages (keys[0] covers the tools alone)."""
    h = hashlib.sha256(json.dumps(tools or [], sort_keys=True).encode())
    keys = [h.hexdigest()]
    for m in messages:
        h.update(b"\x00" + canonical(m).encode())
        keys.append(h.copy().hexdigest())
    return keys


@dataclass
class Session:
    """One chat session and the job that holds its context."""

    session_id: str
    explicit: bool  # the client named it (else found by prefix)
    job_id: str | None = None  # None: no live job (the next request starts one)
    busy: bool = False
    turn_started: bool = False  # the busy turn's segment has started
    last_used: float = field(default_factory=time.monotonic)
    # After a turn: what the job's context holds, to continue it.
    key: str | None = None  # prefix key of the request's messages plus the reply
    n_messages: int = 0  # messages in that request
    prompt_text: str = ""  # that request's rendered prompt
    generated_text: str = ""  # the reply's tokens decoded with special tokens
    context_tokens: int = 0  # tokens in the job's context (prompts + generated)
    tool_started: bool = False  # ReportToolCall START sent, END not yet
    context_differs: bool = False  # the job's context is not what the reply's text says

    def continues(self, keys: list[str]) -> bool:
        """Whether a request with these prefix keys extends this session's last turn by at
        least one message."""
        n = self.n_messages + 1
        return self.key is not None and len(keys) > n + 1 and keys[n] == self.key


class SessionTable:
    """The live sessions of one gateway."""

    def __init__(self) -> None:
        self.by_id: dict[str, Session] = {}
        self._by_key: dict[str, Session] = {}

    def find(self, session_id: str | None, keys: list[str]) -> Session | None:
        """The named session (None if unknown), or with no name the live session whose last
        turn the messages extend, the longest first."""
        if session_id is not None:
            return self.by_id.get(session_id)
        for i in range(len(keys) - 2, 0, -1):  # at least one new message after the match
            s = self._by_key.get(keys[i])
            if s is not None and s.key == keys[i]:
                return s
        return None

    def new(self, session_id: str | None) -> Session:
        s = Session(session_id or f"sess-{uuid.uuid4().hex}", explicit=session_id is not None)
        self.by_id[s.session_id] = s
        return s

    def turn_ended(self, s: Session, key: str) -> None:
        if s.key is not None and self._by_key.get(s.key) is s:
            del self._by_key[s.key]
        s.key, s.context_differs = key, False
        self._by_key[key] = s

    def drop_key(self, s: Session) -> None:
        """No chat request continues the session's last turn (a text completion ran on it);
        its job and context stay."""
        if s.key is not None and self._by_key.get(s.key) is s:
            del self._by_key[s.key]
        s.key = None

    def forget_turn(self, s: Session) -> None:
        """The session's job is gone: nothing can continue its last turn."""
        if s.key is not None and self._by_key.get(s.key) is s:
            del self._by_key[s.key]
        s.key, s.job_id, s.tool_started, s.context_differs = None, None, False, False

    def remove(self, s: Session) -> None:
        self.forget_turn(s)
        if self.by_id.get(s.session_id) is s:
            del self.by_id[s.session_id]

    def idle(self, older_than_s: float, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        return [s for s in self.by_id.values()
                if (not s.busy or not s.turn_started) and now - s.last_used > older_than_s]
