"""The embedded default: one SQLite file in WAL mode.

WAL lets the writer commit without blocking readers and makes a commit one sequential append
to the log; `synchronous=NORMAL` skips the fsync at each commit (the log is synced at
checkpoints), so a committed batch survives the process being killed, though not a power loss.
One process owns a state file at a time: a second store on it is refused (an advisory lock
on `<file>.lock`, released by the kernel when the owner dies, even by SIGKILL).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from astraea.store import STORE_WRITERS
from astraea.store.child_writer import ChildWriter
from astraea.store.records import StoreError
from astraea.store.sql import Dialect, SqlStore

DB_FILE = "astraea.db"  # the file inside a state directory

SQLITE = Dialect(name="sqlite", placeholder="?", real="REAL", int="INTEGER", blob="BLOB",
                 # IMMEDIATE takes the write lock at once: two processes creating the schema
                 # at the same time are serialized, not failed halfway.
                 begin_schema=("BEGIN IMMEDIATE",))


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in autocommit mode, WAL, `synchronous=NORMAL` (the store's and its writer
    process's); StoreError if the file system refuses WAL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        conn.close()
        raise StoreError(f"{path}: SQLite cannot use WAL mode here (got {mode!r}; a network "
                         "file system?)")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_sqlite(path: str | os.PathLike, *, writer: str = "thread", **batching) -> SqlStore:
    """The store in the SQLite file `path` (created with its directory if missing). `writer`:
    "thread" (writer.py: any thread may call the store) or "process" (child_writer.py: the
    statements run in a child process driven from the caller's event loop; one thread only)."""
    if writer not in STORE_WRITERS:
        raise StoreError(f"unknown store writer {writer!r}: {' or '.join(STORE_WRITERS)}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "a")  # noqa: SIM115 - held for the store's lifetime
    except OSError as e:
        raise StoreError(f"{path}: cannot create the state file: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StoreError(f"{path}: another process has this state file open (a control plane "
                         "still running?); each needs its own state directory") from None
    try:
        conn = connect(path)
    except sqlite3.Error as e:
        lock.close()
        raise StoreError(f"{path}: cannot open the SQLite database: {e}") from None
    except BaseException:
        lock.close()
        raise
    if writer == "thread":
        return SqlStore(conn, SQLITE, str(path), on_close=lock.close, **batching)

    def in_child(schema_conn: sqlite3.Connection) -> ChildWriter:
        schema_conn.close()  # the child opens its own
        return ChildWriter(str(path), str(path), interval_s=batching["batch_interval_s"],
                           max_ops=batching["batch_max_ops"], keep_fds=(lock.fileno(),),
                           on_close=lock.close)
    try:
        return SqlStore(conn, SQLITE, str(path), writer=in_child, **batching)
    except BaseException:
        lock.close()
        raise
