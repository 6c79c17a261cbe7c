"""Named sessions kept in the durable store, so that every gateway on one database (and a
restarted gateway) continues the same control-plane job.

The stored record holds what the job's context is (its id, the last turn's rendered prompt,
the reply's tokens as text, the prefix key, the token count, whether a tool wait is open):
exactly what `Chats._continuation` compares a new prompt against, so the rule that nothing
is answered from a context the prompt does not extend holds across gateways. A turn runs
under a claim: a compare-and-set on the record's version makes this gateway its holder (a
second request, on any gateway, gets 409 `session_busy`), loads the state, and the turn's end
writes the new state back with the holder cleared. A holder renews its lease while its turn
runs; a holder that died (lease over) loses the session, and since what its turn did to the
job is unknown, the next turn starts a new job instead of trusting the context.

A record's id is `owner:name` (`Session.store_id`): the same name sent with another API key
is another session.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from astraea.store import GatewaySession, Store, StoreError
from astraea.telemetry import get_logger
from gateway import errors
from gateway.sessions import Session, SessionTable

log = get_logger("astraea.gateway")

DEFAULT_LEASE_S = 30.0  # renewed every reaper period (5 s at most) while a turn runs

# The Session fields that say what the job's context holds.
STATE_FIELDS = ("job_id", "key", "n_messages", "prompt_text", "generated_text",
                "context_tokens", "tool_started", "context_differs")


_DEFAULTS = {f: getattr(Session("", explicit=True), f) for f in STATE_FIELDS}


def state_of(s: Session) -> dict:
    return {f: getattr(s, f) for f in STATE_FIELDS}


class SharedSessions:
    """The store side of the named sessions of one gateway."""

    def __init__(self, store: Store, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.lease_s = lease_s
        self.holder = f"gw-{uuid.uuid4().hex[:16]}"  # this gateway process

    async def claim(self, s: Session, table: SessionTable) -> None:
        """Hold `s` for one turn and load its stored state into it; ApiError 409 when a
        request on any gateway holds it."""
        try:
            await self._claim(s, table)
        except ValueError as e:  # a name the store cannot hold
            raise errors.bad_request(f"invalid session id: {e}", "session_id") from None
        except StoreError as e:
            raise errors.ApiError(503, f"the gateway's session store failed: {e}",
                                  "service_unavailable", code="state_store_unavailable") \
                from None

    async def _claim(self, s: Session, table: SessionTable) -> None:
        rec = await asyncio.to_thread(self.store.get_session, s.store_id)
        now = time.time()
        if rec is not None and rec.holder and rec.lease_until_unix_s >= now:
            raise errors.session_busy(s.session_id)
        new = GatewaySession(s.store_id, rec.version + 1 if rec else 1, self.holder,
                             now + self.lease_s, now, rec.state if rec else {})
        won = await asyncio.to_thread(self.store.put_session, new,
                                      rec.version if rec else None)
        if not won:  # another gateway claimed it between the read and the write
            raise errors.session_busy(s.session_id)
        await self.store.flush_async()  # visible to the others now
        s.shared, s.claim = True, new
        state = dict(new.state)
        table.turn_ended(s, None)  # its key is the stored one, set below
        for f in STATE_FIELDS:
            setattr(s, f, state.get(f, _DEFAULTS[f]))
        if rec is not None and rec.holder:
            # The last holder died mid-turn: the job may hold more than the state says.
            s.context_differs = True

    def release(self, s: Session) -> None:
        """The turn is over: store what the job's context holds now and free the session.
        Queued (callable from a cancelled task); `flush` makes it visible."""
        c, s.claim = s.claim, None
        if c is None:
            return
        try:
            self.store.put_session_nowait(
                GatewaySession(s.store_id, c.version + 1, "", 0.0, time.time(),
                               state_of(s)), c.version)
        except StoreError as e:
            # Its lease lapses unrenewed; the next turn then starts a new job: safe.
            log.warning("session not released in the store", session_id=s.session_id,
                        error=str(e))

    async def delete(self, s: Session) -> None:
        """The session is over (closed, or idle): its record goes."""
        c, s.claim = s.claim, None
        if c is not None:
            await asyncio.to_thread(self.store.delete_session, s.store_id, c.version)
            await self.store.flush_async()

    def renew(self, sessions: list[Session]) -> None:
        """Extend the lease of every session this gateway holds (queued writes)."""
        until = time.time() + self.lease_s
        for s in sessions:
            if s.claim is not None:
                s.claim = replace(s.claim, lease_until_unix_s=until)
                self.store.put_session_nowait(s.claim, s.claim.version)

    async def take_stale(self, idle_s: float) -> list[Session]:
        """Claim the sessions idle (on every gateway) for longer than `idle_s`, and those
        whose holder died: the caller ends their jobs and `delete`s them."""
        now = time.time()
        stale = await asyncio.to_thread(self.store.stale_sessions, now - idle_s, now)
        taken = []
        for rec in stale:
            claim = replace(rec, version=rec.version + 1, holder=self.holder,
                            lease_until_unix_s=now + self.lease_s)
            if await asyncio.to_thread(self.store.put_session, claim, rec.version):
                owner, _, name = rec.session_id.partition(":")
                s = Session(name, explicit=True, owner=owner, shared=True, claim=claim)
                s.job_id = rec.state.get("job_id")
                taken.append(s)
        if taken:
            await self.store.flush_async()
        return taken

    async def continues(self, owner: str, session_id: str, key: str | None) -> bool:
        """Whether the owner's stored session is free and its last turn is the one with `key`
        (a Responses API chain that can go on in its job)."""
        rec = await asyncio.to_thread(self.store.get_session, f"{owner}:{session_id}")
        return rec is not None and key is not None and rec.state.get("key") == key and \
            (not rec.holder or rec.lease_until_unix_s < time.time())

    async def flush(self) -> None:
        try:
            await self.store.flush_async()
        except StoreError as e:  # the reply is done; the store's failure is logged, not sent
            log.warning("session state not committed", error=str(e))
