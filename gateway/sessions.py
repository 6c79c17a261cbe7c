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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from astraea.store import GatewaySession

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

    session_id: str  # the name the client knows it by (unique per owner)
    explicit: bool  # the client named it (else found by prefix)
    # The owner id of the API key that opened it ("" without keys): another key never finds
    # it, by name or by prefix.
    owner: str = ""
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
    # Kept in the durable store for every gateway on it (gateway/shared_sessions.py): the
    # state above is loaded from there at each turn's start, under `claim`.
    shared: bool = False
    claim: GatewaySession | None = None  # the stored record this gateway holds for a turn

    @property
    def ref(self) -> tuple[str, str]:
        return self.owner, self.session_id

    @property
    def store_id(self) -> str:
        """Its id in the durable store: owner and name (an owner id has no ':')."""
        return f"{self.owner}:{self.session_id}"

    def continues(self, keys: list[str]) -> bool:
        """Whether a request with these prefix keys extends this session's last turn by at
        least one message."""
        n = self.n_messages + 1
        return self.key is not None and len(keys) > n + 1 and keys[n] == self.key


class SessionTable:
    """The live sessions of one gateway, each under (owner, name)."""

    def __init__(self) -> None:
        self.by_id: dict[tuple[str, str], Session] = {}
        self._by_key: dict[tuple[str, str], Session] = {}  # (owner, key of its last turn)

    def find(self, session_id: str | None, keys: list[str], owner: str = "") -> Session | None:
        """The owner's named session (None if unknown), or with no name the owner's live
        session whose last turn the messages extend, the longest first."""
        if session_id is not None:
            return self.by_id.get((owner, session_id))
        for i in range(len(keys) - 2, 0, -1):  # at least one new message after the match
            s = self._by_key.get((owner, keys[i]))
            if s is not None and s.key == keys[i]:
                return s
        return None

    def get(self, owner: str, session_id: str) -> Session | None:
        return self.by_id.get((owner, session_id))

    def holds(self, s: Session) -> bool:
        return self.by_id.get(s.ref) is s

    def new(self, session_id: str | None, owner: str = "") -> Session:
        s = Session(session_id or f"sess-{uuid.uuid4().hex}", explicit=session_id is not None,
                    owner=owner)
        self.by_id[s.ref] = s
        return s

    def _unkey(self, s: Session) -> None:
        if s.key is not None and self._by_key.get((s.owner, s.key)) is s:
            del self._by_key[(s.owner, s.key)]

    def turn_ended(self, s: Session, key: str | None) -> None:
        self._unkey(s)
        s.key, s.context_differs = key, False
        # A shared session is found by its name only: its key here may be stale (another
        # gateway may have moved it on), and a prefix match must never end its job.
        if key is not None and not s.shared:
            self._by_key[(s.owner, key)] = s

    def drop_key(self, s: Session) -> None:
        """No chat request continues the session's last turn (a text completion ran on it);
        its job and context stay."""
        self._unkey(s)
        s.key = None

    def forget_turn(self, s: Session) -> None:
        """The session's job is gone: nothing can continue its last turn."""
        self._unkey(s)
        s.key, s.job_id, s.tool_started, s.context_differs = None, None, False, False

    def remove(self, s: Session) -> None:
        self.forget_turn(s)
        if self.holds(s):
            del self.by_id[s.ref]

    def idle(self, older_than_s: float, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        return [s for s in self.by_id.values()
                if (not s.busy or not s.turn_started) and now - s.last_used > older_than_s]
