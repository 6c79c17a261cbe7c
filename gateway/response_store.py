"""Stored Responses API responses: what `GET /v1/responses/{id}` returns and what a later
request's `previous_response_id` continues.

`ResponseStore` is the narrow interface (get, put); `MemoryResponseStore` keeps the newest
`capacity` responses in this process. A record is plain JSON-able data so that a durable
store can keep it as it is.
"""

from __future__ import annotations

import abc
import threading
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_CAPACITY = 10_000  # responses kept in memory; the oldest go first


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


class ResponseStore(abc.ABC):
    """Where responses are kept. Implementations must be safe to call from the event loop
    (fast, or offloaded by the caller) and keep records unchanged."""

    @abc.abstractmethod
    def get(self, response_id: str) -> StoredResponse | None:
        """The response with this id, or None when it is unknown (never stored, or dropped)."""

    @abc.abstractmethod
    def put(self, response: StoredResponse) -> None:
        """Keep `response` (replacing one with the same id)."""


class MemoryResponseStore(ResponseStore):
    """The newest `capacity` responses, in memory; putting one more drops the oldest."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._items.get(response_id)

    def put(self, response: StoredResponse) -> None:
        with self._lock:
            self._items.pop(response.id, None)
            self._items[response.id] = response
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
