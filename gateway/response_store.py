"""Stored Responses API responses: what `GET /v1/responses/{id}` returns and what a later
request's `previous_response_id` continues.

`ResponseStore` is the narrow interface (get, put); `MemoryResponseStore` keeps the newest
`capacity` responses in this process; `StoreResponseStore` keeps them in the durable store
(`--state-dir` / `--database`), where every gateway on it and a restarted one find them, for
`retention_s` after their creation (bounded by age, not by count).
"""

from __future__ import annotations

import abc
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from astraea.store import Store
from astraea.store import StoredResponse as StoreRecord
from gateway.config import DEFAULT_RESPONSE_RETENTION_S

DEFAULT_CAPACITY = 10_000  # responses kept in memory; the oldest go first
DEFAULT_RETENTION_S = DEFAULT_RESPONSE_RETENTION_S  # OpenAI's own default, 30 days
PRUNE_EVERY_S = 60.0  # how often a putting gateway deletes the expired ones


@dataclass(frozen=True)
class StoredResponse:
    """One finished response."""

    id: str
    body: dict  # the response object, as returned
    # The conversation through this response, as Chat Completions messages (dicts of the
    # request schema), without `instructions` (OpenAI does not carry them to the next turn).
    messages: list[dict]
    session_id: str | None  # the gateway session whose job holds the context
    session_key: str | None  # the session's prefix key right after this response
    owner: str = ""  # the owner id of the API key that created it ("" without keys)


class ResponseStore(abc.ABC):
    """Where responses are kept. Implementations must be safe to call from the event loop
    (fast, or offloaded by the caller) and keep records unchanged."""

    @abc.abstractmethod
    def get(self, response_id: str, owner: str = "") -> StoredResponse | None:
        """`owner`'s response with this id, or None when it is unknown (never stored, dropped,
        or another owner's: indistinguishable, so ids tell nothing across keys)."""

    @abc.abstractmethod
    def put(self, response: StoredResponse) -> None:
        """Keep `response` (replacing one with the same id)."""

    async def flush(self) -> None:
        """Every put so far is durable and visible to other gateways (a no-op in memory)."""
        return None


class MemoryResponseStore(ResponseStore):
    """The newest `capacity` responses, in memory; putting one more drops the oldest."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str, owner: str = "") -> StoredResponse | None:
        with self._lock:
            r = self._items.get(response_id)
        return r if r is not None and r.owner == owner else None

    def put(self, response: StoredResponse) -> None:
        with self._lock:
            self._items.pop(response.id, None)
            self._items[response.id] = response
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class StoreResponseStore(ResponseStore):
    """Responses in the durable store: kept across restarts and shared by the gateways on one
    database, each for `retention_s` after it was created. `get` waits for the database:
    callers on the event loop offload it (`asyncio.to_thread`); `put` is a queued write."""

    def __init__(self, store: Store, retention_s: float = DEFAULT_RETENTION_S) -> None:
        if not retention_s > 0:
            raise ValueError("retention_s must be positive")
        self.store = store
        self.retention_s = retention_s
        self._next_prune = 0.0

    def get(self, response_id: str, owner: str = "") -> StoredResponse | None:
        try:
            rec = self.store.get_response(response_id)
        except ValueError:  # an id the store could never hold (too long, NUL): unknown
            return None
        if rec is None or rec.created_unix_s < time.time() - self.retention_s:
            return None  # expired, not yet pruned
        if rec.owner != owner:
            return None
        p = rec.payload
        return StoredResponse(rec.response_id, p["body"], p["messages"], rec.session_id,
                              p.get("session_key"), rec.owner)

    def put(self, response: StoredResponse) -> None:
        now = time.time()
        self.store.put_response(StoreRecord(
            response.id, response.owner, response.session_id, now,
            {"body": response.body, "messages": response.messages,
             "session_key": response.session_key}))
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            self.store.prune_responses(now - self.retention_s)

    async def flush(self) -> None:
        await self.store.flush_async()
