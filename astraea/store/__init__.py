"""Durable state: what must survive a control-plane crash (jobs, their segments' progress and
transcripts), the gateway's stored Responses and shared sessions, and named blobs (the predictor's state).

    store = open_store("/var/lib/astraea")             # SQLite (WAL) in a state directory
    store = open_store("postgresql://astraea@db/astraea")  # or a PostgreSQL database

`Store` (interface.py) is the contract; both backends are the batched `SqlStore` (sql.py)
on their own connection. The foundation layer: it imports no service.
"""

from __future__ import annotations

import os
from pathlib import Path

from astraea.store.interface import Store
from astraea.store.records import (
    UPDATABLE_FIELDS,
    GatewaySession,
    JobRecord,
    SchemaVersionError,
    SegmentProgress,
    StoredResponse,
    StoreError,
    TranscriptPiece,
)
from astraea.store.sql import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "UPDATABLE_FIELDS", "GatewaySession", "JobRecord", "SchemaVersionError",
           "SegmentProgress", "Store", "StoreError", "StoredResponse", "TranscriptPiece",
           "STORE_WRITERS", "open_store"]

# Where SQLite's statements can run (open_store's `writer`; the services' --store-writer).
STORE_WRITERS = ("thread", "process")


def open_store(target: str | os.PathLike, *, batch_interval_s: float = 0.01,
               batch_max_ops: int = 512, reconnect_timeout_s: float = 60.0,
               writer: str = "thread") -> Store:
    """Open (creating if needed) the store `target` names:

    * a directory path (created if missing): SQLite in `<dir>/astraea.db`;
    * `sqlite:///abs/path.db` or `sqlite://rel/path.db`: SQLite in that file (a directory
      there: `<dir>/astraea.db`);
    * `postgresql://...` or `postgres://...`: that PostgreSQL database (a libpq URL).

    Writes are committed every `batch_interval_s` seconds or `batch_max_ops` writes,
    whichever first (see interface.py for what that means for durability). A PostgreSQL
    connection lost later is reopened for up to `reconnect_timeout_s`. SQLite's `writer`:
    "thread" (any thread may call the store) or "process" (its statements run in a child
    process that the caller's event loop drives: for an asyncio owner that calls the store
    from its loop's thread only, like the control plane; see child_writer.py). PostgreSQL's
    statements always go through a thread (its server is already another process). Anything
    else raises `StoreError` saying what is accepted.
    """
    from astraea.store.postgres import open_postgres, redact
    from astraea.store.sqlite import DB_FILE, open_sqlite

    batching = {"batch_interval_s": batch_interval_s, "batch_max_ops": batch_max_ops}
    text = os.fspath(target)
    if not isinstance(text, str) or not text.strip():
        raise StoreError("no store given: pass a state directory, sqlite:///path or "
                         "postgresql://user@host/db")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        return open_postgres(text, reconnect_timeout_s=reconnect_timeout_s, **batching)
    if scheme == "sqlite":
        path = Path(text.split("://", 1)[1])
        if not str(path) or str(path) == ".":
            raise StoreError(f"{text}: no file named: use sqlite:///path/to/file.db")
        return open_sqlite(path / DB_FILE if path.is_dir() else path, writer=writer,
                           **batching)
    if scheme:
        raise StoreError(f"{redact(text)}: unsupported store scheme {scheme!r}: pass a state "
                         "directory, sqlite:///path or postgresql://user@host/db")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{text}: not a directory: a state directory holds {DB_FILE} (for a "
                         f"single file, say sqlite://{text})")
    return open_sqlite(path / DB_FILE, writer=writer, **batching)
