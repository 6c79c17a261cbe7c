"""The operator's choice: a PostgreSQL database, through psycopg 3.

Same schema and batching as SQLite (sql.py). With PostgreSQL's default `synchronous_commit=on`
a committed batch survives a power loss too. A lost connection (the server restarted) is
reopened with backoff and the cut batch committed again (writer.py). psycopg is imported only
here, when a `postgresql://` URL is opened: the embedded default needs nothing beyond the
standard library.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from astraea.store.records import StoreError
from astraea.store.sql import Dialect, SqlStore

POSTGRES = Dialect(name="postgresql", placeholder="%s", real="DOUBLE PRECISION", int="BIGINT",
                   blob="BYTEA",
                   # A transaction-scoped advisory lock (any fixed key) serializes two
                   # processes creating the schema at once; CREATE ... IF NOT EXISTS alone races.
                   begin_schema=("BEGIN", "SELECT pg_advisory_xact_lock(7305310412)"),
                   pipeline=True)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def open_postgres(url: str, *, connect_timeout_s: float = 10.0,
                  reconnect_timeout_s: float = 60.0, **batching) -> SqlStore:
    """The store in the PostgreSQL database `url` names (postgresql://user@host:port/db).
    A connection lost later is reopened for up to `reconnect_timeout_s` (writer.py)."""
    shown = redact(url)
    try:
        import psycopg
    except ImportError:
        raise StoreError(f"{shown}: a PostgreSQL store needs psycopg 3: "
                         "pip install 'astraea-serving[postgres]'") from None

    def connect():
        # autocommit: transactions are the writer's explicit BEGIN/COMMIT batches.
        return psycopg.connect(url, autocommit=True,
                               connect_timeout=max(1, round(connect_timeout_s)))

    try:
        conn = connect()
    except psycopg.Error as e:
        raise StoreError(f"{shown}: cannot connect to PostgreSQL: "
                         f"{str(e).strip() or type(e).__name__}") from None
    return SqlStore(conn, POSTGRES, shown, reconnect=connect, lost=_lost,
                    reconnect_timeout_s=reconnect_timeout_s, **batching)


def _lost(conn, error: BaseException) -> bool:
    """The connection is gone (server restarted or unreachable), not a statement refused."""
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False))
