"""The writer thread behind `SqlStore`: one connection, batched commits, reconnection.

Callers queue operations and return (writes) or wait on a future (reads, flushes, close). The
thread takes everything queued in *rounds*; a round is one transaction, committed before any
future of the round is answered. A round starts when someone waits (a read, a flush, close),
when `max_ops` operations are queued, or `interval_s` after the first write since the last
round: so a stream of writes with a flush now and then (the control plane's event gate) costs
one wake-up and one commit per flush, and a write alone never wakes the thread (only the first
one after it went idle does, to arm its timer). Waking a thread costs the caller's thread more
than the write itself (a futex call, then the GIL handed over), so that matters.

Reconnection (PostgreSQL). When the connection is lost (the server restarted, a network cut),
the round in flight is rolled back by the server; the thread reconnects with exponential
backoff for at most `reconnect_timeout_s` and runs the same round again. Every write the store
makes is idempotent (upserts, absolute updates, deletes, output chunks keyed by their token
offset), so a round that did commit before its acknowledgement was lost can run twice. While it
reconnects: writes and flushes queue and wait (nothing is lost, no flush returns early); reads
fail at once with `StoreError` (a caller must not block on them); `outage` says why. If the
database stays unreachable past the timeout, the store fails for good, as on any other error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from astraea.store.records import StoreError
from astraea.telemetry.logs import get_logger

log = get_logger("astraea.store")

WRITE, READ, FLUSH, CLOSE = range(4)
Statement = tuple[str, tuple]

FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.05, 2.0


class BatchWriter:
    """Owns `conn` (autocommit mode) and the thread that uses it. `reconnect`: opens a new
    connection (None: a lost connection fails the store); `lost(conn, error)`: whether `error`
    means the connection is gone."""

    def __init__(self, conn: Any, url: str, *, interval_s: float, max_ops: int,
                 pipeline: bool = False, reconnect: Callable[[], Any] | None = None,
                 lost: Callable[[Any, BaseException], bool] | None = None,
                 reconnect_timeout_s: float = 60.0, name: str = "store-writer",
                 on_close: Callable[[], None] | None = None) -> None:
        self._conn, self._url = conn, url
        self._interval, self._max_ops = interval_s, max_ops
        self._pipeline = pipeline
        self._reconnect_fn, self._lost = reconnect, lost
        self._reconnect_timeout = reconnect_timeout_s
        self._on_close = on_close
        self._queue: collections.deque = collections.deque()  # append/popleft: thread-safe
        self._wake = threading.Event()
        self._due = False  # someone waits (or the batch is full): run a round now
        self._sleeping = False  # the thread waits with no timer: the next write wakes it
        self._stop = threading.Event()  # close() during an outage: stop reconnecting
        self._lock = threading.Lock()  # orders enqueueing against failure and close
        self._failed: StoreError | None = None
        self._closed = False
        self._outage: str | None = None
        self.commits = 0  # transactions committed (a gauge for tests and benchmarks)
        self.statements = 0  # write statements committed (the same)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the callers' side --------------------------------------------------------------------
    def put(self, kind: int, payload: Any = None) -> Future | None:
        fut = Future() if kind != WRITE else None
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._closed:
                raise StoreError(f"{self._url}: the store is closed")
            if kind == READ and self._outage is not None:
                raise StoreError(self._outage)
            if kind == CLOSE:
                self._closed = True
            self._queue.append((kind, payload, fut))
            full = len(self._queue) >= self._max_ops
        # The thread re-reads the queue and `_due` after clearing `_wake`, so a wake already
        # pending covers this call too: setting it again would cost a lock and a notify per
        # write while the woken thread waits for the GIL.
        if kind != WRITE or full:
            self._due = True
            if not self._wake.is_set():
                self._wake.set()
        elif self._sleeping and not self._wake.is_set():  # read after the append (the GIL)
            self._wake.set()
        return fut

    async def flush_async(self) -> None:
        """`put(FLUSH)` awaited from an event loop (the thread answers it)."""
        await asyncio.wrap_future(self.put(FLUSH))

    async def close_async(self) -> None:
        """`close` from an event loop: the wait for the thread happens off the loop."""
        await asyncio.to_thread(self.close)

    @property
    def outage(self) -> str | None:
        return self._outage

    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._lock:
            done = self._closed or self._failed is not None
        if not done:
            try:
                fut = self.put(CLOSE)
                self._stop.set()  # closing: a lost connection is not waited for
                fut.result()
            except StoreError:
                pass  # failed or closed meanwhile: the connection is released either way
        self._stop.set()
        self._thread.join()

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        tick: float | None = None  # when the writes queued since the last round must commit
        ops: list = []
        try:
            while True:
                while not self._due:
                    now = time.monotonic()
                    if tick is not None and now >= tick:
                        break
                    if tick is None and self._queue:
                        tick = now + self._interval  # the first write: arm the timer
                        continue
                    if tick is None:
                        self._sleeping = True
                        if not self._queue and not self._due:
                            self._wake.wait()
                        self._sleeping = False
                    else:
                        self._wake.wait(tick - now)
                    self._wake.clear()
                self._due = False
                tick = None
                ops = self._take()
                closing = self._round_retrying(ops)
                if closing is not None:
                    self._close_conn()
                    closing.set_result(None)
                    return
                if len(self._queue) >= self._max_ops:
                    self._due = True  # a flood: the next round at once
        except StoreError as e:
            self._fail(e, ops)
        except Exception as e:  # the database failed: nothing queued can be trusted to land
            self._fail(StoreError(f"{self._url}: the store failed, writes since the last "
                                  f"flush may be lost: {type(e).__name__}: {e}"), ops)

    def _take(self) -> list:
        ops, q = [], self._queue
        while q and len(ops) < self._max_ops:
            ops.append(q.popleft())
        return ops

    def _round_retrying(self, ops: list) -> Future | None:
        while True:
            try:
                return self._round(ops)
            except Exception as e:
                if self._reconnect_fn is None or self._lost is None \
                        or not self._lost(self._conn, e):
                    raise
                self._reconnect(e, ops)

    def _round(self, ops: list) -> Future | None:
        """One transaction: every write and read of `ops` in order, then COMMIT; then the
        reads' results, the flushes and a close are answered."""
        c = self._conn.cursor()
        runs = _Runs(c)
        answers: list[tuple[Future, list]] = []
        waiters: list[Future] = []
        closing: Future | None = None
        statements = 0
        sql_ops = any(k == WRITE or (k == READ and not f.done()) for k, _, f in ops)
        # PostgreSQL: a pipeline sends the round's statements without waiting for each reply;
        # leaving the block waits for all, so nothing is answered before the server committed.
        with self._conn.pipeline() if self._pipeline and sql_ops else contextlib.nullcontext():
            if sql_ops:
                c.execute("BEGIN")
            for kind, payload, fut in ops:
                if kind == WRITE:
                    statements += len(payload)
                    for sql, params in payload:
                        runs.add(sql, params)
                elif kind == READ:
                    if fut.done():  # failed at once during an outage
                        continue
                    runs.send()
                    sql, params = payload
                    answers.append((fut, c.execute(sql, params).fetchall()))
                elif kind == FLUSH:
                    waiters.append(fut)
                else:
                    closing = fut
            runs.send()
            if sql_ops:
                c.execute("COMMIT")
        if sql_ops:
            self.commits += 1
            self.statements += statements
        for fut, rows in answers:
            fut.set_result(rows)
        for fut in waiters:
            fut.set_result(None)
        return closing

    def _reconnect(self, error: BaseException, ops: list) -> None:
        """Reconnect with backoff, or raise StoreError once `reconnect_timeout_s` has passed
        (or close() was called)."""
        since = time.monotonic()
        cause = f"{type(error).__name__}: {str(error).strip() or 'connection lost'}"
        with self._lock:
            self._outage = (f"{self._url}: the database is unreachable ({cause}); reconnecting "
                            f"for up to {self._reconnect_timeout:g} s")
            reads = [f for k, _, f in (*ops, *self._queue) if k == READ]
        log.warning("store connection lost, reconnecting", store=self._url, error=cause,
                    queued=len(self._queue) + len(ops))
        for fut in reads:  # nobody may block on a read meanwhile (it may be an event loop)
            if not fut.done():
                fut.set_exception(StoreError(self._outage))
        with contextlib.suppress(Exception):
            self._conn.close()
        delay, attempts, last = FIRST_BACKOFF_S, 0, cause
        while True:
            if self._stop.wait(delay):
                raise StoreError(f"{self._url}: closed while the database was unreachable "
                                 f"({last}): the writes not yet committed are lost")
            attempts += 1
            try:
                self._conn = self._reconnect_fn()
                break
            except Exception as e:
                last = f"{type(e).__name__}: {str(e).strip() or 'no answer'}"
            if time.monotonic() - since + delay > self._reconnect_timeout:
                raise StoreError(f"{self._url}: the database stayed unreachable for "
                                 f"{time.monotonic() - since:.1f} s ({last}); writes since "
                                 "the last flush may be lost")
            delay = min(2 * delay, MAX_BACKOFF_S)
        with self._lock:
            self._outage = None
        log.info("store reconnected", store=self._url, attempts=attempts,
                 down_s=round(time.monotonic() - since, 3))

    def _fail(self, error: StoreError, current: list) -> None:
        with self._lock:
            self._failed = error
            self._outage = None
            left = list(current)
            while self._queue:
                left.append(self._queue.popleft())
        for _, _, fut in left:
            if fut is not None and not fut.done():
                fut.set_exception(error)
        with contextlib.suppress(Exception):
            self._conn.execute("ROLLBACK")  # the connection may be gone: closing is what is left
        self._close_conn()

    def _close_conn(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class _Runs:
    """Consecutive statements with the same SQL (a stream's output chunks, say), sent as one
    executemany: one driver call instead of one per write, in the same order."""

    def __init__(self, cursor: Any) -> None:
        self.cursor, self.sql, self.params = cursor, "", []

    def add(self, sql: str, params: tuple) -> None:
        if sql != self.sql:
            self.send()
            self.sql = sql
        self.params.append(params)

    def send(self) -> None:
        if len(self.params) == 1:
            self.cursor.execute(self.sql, self.params[0])
        elif self.params:
            self.cursor.executemany(self.sql, self.params)
        self.params = []
