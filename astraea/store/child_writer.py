"""SQLite's statements in a child process, driven from the caller's event loop: no thread.

Why. With the writer thread (writer.py), every commit round wakes a second thread of the
control plane, which takes the interpreter lock from the event loop and hands it back; on a
machine whose cores are all busy those hand-overs cost the loop far more than the statements
(bench-service: the store's calls with the statements skipped cost as much as with them; the
calls answered at once cost almost nothing). Here the loop writes each round to a child's
stdin and reads the child's answers as its selector reports them: the statements run on
another core, and nothing else in the process competes for the lock.

Same contract as `BatchWriter.put` (writes queue; a round is sent when someone waits, when
`max_ops` are queued, or `interval_s` after the first write), with two limits: it must be
called from one thread (the event loop's; a caller without a running loop gets its rounds sent
at its next flush or read), and a read blocks that thread until the child answers (reads are
rare: recovery at start, a resumed segment). The child holds the state file's lock with its
parent (the same open file), exits when its stdin closes (a round cut mid-frame is never run;
one being run is rolled back by SQLite if the child dies), runs in a session of its own (a
Ctrl-C meant for the owner reaches it only as that EOF, after the owner's last round), and its
death fails the store.

    python -m astraea.store.child_writer PATH   # the child: frames in on stdin, answers out
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pickle
import select
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from astraea.store.records import StoreError
from astraea.store.writer import CLOSE, FLUSH, READ, WRITE, _Runs

_HEADER = struct.Struct("<I")  # each frame: its length, then a pickle


class _Waitable(Future):
    """A future whose blocking `result()` reads the child's answers meanwhile (the caller is
    the thread that would otherwise read them)."""

    def __init__(self, writer: ChildWriter) -> None:
        super().__init__()
        self._writer = writer

    def result(self, timeout: float | None = None) -> Any:
        self._writer._wait(self, timeout)
        return super().result(timeout=0)


class ChildWriter:
    def __init__(self, path: str, url: str, *, interval_s: float, max_ops: int,
                 keep_fds: tuple[int, ...] = (),
                 on_close: Callable[[], None] | None = None) -> None:
        self._url, self._interval, self._max_ops = url, interval_s, max_ops
        self._on_close = on_close
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "astraea.store.child_writer", path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=keep_fds,
                # Out of the terminal's process group: a Ctrl-C meant for the owner must not
                # kill the child before the owner's last round (it exits on EOF instead).
                start_new_session=True)
        except OSError as e:
            raise StoreError(f"{url}: cannot start the store's writer process: {e}") from None
        self._out_fd, self._in_fd = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        os.set_blocking(self._out_fd, False)
        os.set_blocking(self._in_fd, False)
        self._ops: list = []  # queued, not yet sent
        self._sent = bytearray()  # framed rounds the pipe has not taken yet
        self._waiting_pipe = False  # `_writable` is registered with the loop for the pipe
        self._received = bytearray()
        self._rounds: collections.deque = collections.deque()  # sent rounds' (flushes, read)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.get_ident()
        self._timer: asyncio.TimerHandle | None = None
        self._failed: StoreError | None = None
        self._closed = self._stopped = False
        self.outage: str | None = None  # never: a local file does not go away and come back
        self.commits = self.statements = 0

    # --- the callers' side (BatchWriter's) ----------------------------------------------------
    def put(self, kind: int, payload: Any = None) -> Future | None:
        self._usable()
        if kind == WRITE:
            self._ops.append((WRITE, payload))
            if len(self._ops) >= self._max_ops:
                self._send()
            elif self._timer is None and self._loop is not None:
                self._timer = self._loop.call_later(self._interval, self._send)
            return None
        fut = _Waitable(self)
        if kind == READ:
            self._ops.append((READ, payload))
            self._send(read=fut)
            fut.result()  # a read blocks: see the module docstring
        elif kind == FLUSH:
            self._send(flush=fut)
        elif kind == CLOSE:
            self._closed = True
            self._send(flush=fut)
        return fut

    async def flush_async(self) -> None:
        """`put(FLUSH)` awaited on the loop that reads the answers: an asyncio future set
        there (a thread's future would wake the loop through its self-pipe)."""
        self._usable()
        fut = self._loop.create_future()
        self._send(flush=fut)
        await fut

    def pending(self) -> int:
        return len(self._ops)

    def _usable(self) -> None:
        """Refuse a call from another thread, or after failure or close; follow the
        caller's loop."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("this store is driven by one thread's event loop; it was "
                               "called from another thread")
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise StoreError(f"{self._url}: the store is closed")
        self._attach()

    def close(self) -> None:
        if not self._closed and self._failed is None:
            with contextlib.suppress(StoreError):
                self.put(CLOSE).result()
        self._closed = True
        self._stop_child()

    async def close_async(self) -> None:
        """`close` on the loop's own thread, the only one that may drive this writer."""
        self.close()

    # --- rounds out -----------------------------------------------------------------------
    def _attach(self) -> None:
        """Follow the child's answers on the caller's running loop, if any (a caller that
        runs one loop after another moves with it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is self._loop:
            return
        self._detach()
        self._loop = loop
        if loop is not None:
            loop.add_reader(self._in_fd, self._readable)
            if self._sent:
                loop.add_writer(self._out_fd, self._writable)
                self._waiting_pipe = True

    def _detach(self) -> None:
        """Stop following the child on the current loop (and its timer)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._in_fd)
            self._loop.remove_writer(self._out_fd)
        self._waiting_pipe = False
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send(self, flush: Future | asyncio.Future | None = None,
              read: Future | None = None) -> None:
        self._cancel_timer()
        if self._failed is not None:
            return
        ops, self._ops = self._ops, []
        if ops:
            self.statements += sum(len(p) for k, p in ops if k == WRITE)
            self.commits += 1
        frame = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        self._sent += _HEADER.pack(len(frame)) + frame
        self._rounds.append((flush, read))
        self._writable()

    def _writable(self) -> None:
        try:
            while self._sent:
                n = os.write(self._out_fd, self._sent)
                del self._sent[:n]
        except BlockingIOError:
            pass  # the child is busy: the rest goes when the pipe takes it
        except BrokenPipeError:  # its end of the pipe is closed: the child is gone
            self._child_exited()
            return
        except OSError as e:
            self._fail(f"cannot send to the store's writer process: {e}")
            return
        if self._loop is not None and bool(self._sent) != self._waiting_pipe:
            # Wake when the pipe takes more, only while needed (most rounds fit at once).
            self._waiting_pipe = bool(self._sent)
            if self._sent:
                self._loop.add_writer(self._out_fd, self._writable)
            else:
                self._loop.remove_writer(self._out_fd)

    # --- answers in -----------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = os.read(self._in_fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            data, why = b"", str(e)
        else:
            why = ""
        if not data:
            self._child_exited(why)
            return
        self._received += data
        while len(self._received) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._received)
            if len(self._received) < _HEADER.size + n:
                break
            status, value = pickle.loads(self._received[_HEADER.size:_HEADER.size + n])
            del self._received[:_HEADER.size + n]
            flush, read = self._rounds.popleft()
            if status != "ok":
                self._fail(f"the store failed, writes since the last flush may be lost: "
                           f"{value}")
                return
            if read is not None:
                read.set_result(value)
            if flush is not None and not flush.done():  # an awaiting task may be cancelled
                flush.set_result(None)

    def _wait(self, fut: Future, timeout: float | None) -> None:
        """Read answers (and send what waits) on this thread until `fut` is answered."""
        while not fut.done():
            if self._failed is not None:
                raise self._failed
            if threading.get_ident() != self._thread:
                raise RuntimeError("this store's futures are waited on by its own thread")
            r, w, _ = select.select([self._in_fd], [self._out_fd] if self._sent else [], [],
                                    timeout)
            if not r and not w:
                raise TimeoutError
            if w:
                self._writable()
            if r:
                self._readable()

    # --- failure and the end ----------------------------------------------------------------
    def _child_exited(self, why: str = "") -> None:
        code = self._proc.poll()
        self._fail(f"the store's writer process exited{why and ': ' + why}"
                   f"{'' if code is None else f' (code {code})'}; writes not yet "
                   "committed are lost")

    def _fail(self, why: str) -> None:
        if self._failed is None:
            self._failed = StoreError(f"{self._url}: {why}")
        for flush, read in self._rounds:
            for fut in (flush, read):
                if fut is not None and not fut.done():
                    fut.set_exception(self._failed)
        self._rounds.clear()
        self._stop_child()

    def _stop_child(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._detach()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # the child's EOF: it exits
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        with contextlib.suppress(OSError):
            self._proc.stdout.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def _child(path: str) -> int:
    """Run each round read from stdin as one transaction; answer ("ok", rows of its read or
    None) or ("error", why), then stop."""
    from astraea.store.sqlite import connect  # not at the top: sqlite.py imports this module

    conn = connect(path)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return 0  # the parent closed (or died): nothing half-read is run
        (n,) = _HEADER.unpack(header)
        body = inp.read(n)
        if len(body) < n:
            return 0
        ops = pickle.loads(body)
        try:
            answer = ("ok", _round(conn, ops))
        except Exception as e:  # noqa: BLE001 - the parent fails the store with this
            answer = ("error", f"{type(e).__name__}: {e}")
        frame = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            out.write(_HEADER.pack(len(frame)) + frame)
            out.flush()
        except BrokenPipeError:
            # The parent died (SIGKILL) after sending the round: the round is committed and
            # nobody reads the answer. Exit quietly, stdout pointed at devnull so that the
            # interpreter's last flush does not print a traceback into the parent's log.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return 0
        if answer[0] != "ok":
            return 1


def _round(conn: sqlite3.Connection, ops: list) -> list | None:
    if not ops:
        return None
    c = conn.cursor()
    runs, rows = _Runs(c), None
    c.execute("BEGIN")
    try:
        for kind, payload in ops:
            if kind == WRITE:
                for sql, params in payload:
                    runs.add(sql, params)
            else:
                runs.send()
                rows = c.execute(*payload).fetchall()
        runs.send()
        c.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            c.execute("ROLLBACK")
        raise
    return rows


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
