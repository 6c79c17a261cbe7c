"""`SqlStore`: the `Store` contract on any DB-API database, with batched commits.

One schema in portable SQL (only the column types differ, per `Dialect`), one connection, one
writer thread that owns it (writer.py). Callers queue writes and return; the writer runs
everything queued as one transaction when someone waits (`flush()`, a read, close), when
`batch_max_ops` operations are queued, or `batch_interval_s` after the first write since the
last commit: every flush queued meanwhile shares that one commit. Reads run in that round, in
order, so they see every write queued before them. Every write is idempotent, so a round can
run again after a lost connection (PostgreSQL reconnects, writer.py). The backends (sqlite.py,
postgres.py) only open the connection and name the dialect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import dataclass
from typing import Any

from astraea.store import records as rec
from astraea.store.interface import Store
from astraea.store.records import (
    GatewaySession,
    JobRecord,
    SchemaVersionError,
    SegmentProgress,
    StoredResponse,
    StoreError,
    TranscriptPiece,
)
from astraea.store.writer import FLUSH, READ, WRITE, BatchWriter, Statement

SCHEMA_VERSION = 1

# The connection runs in autocommit mode; transactions are opened and closed by these
# statements, so a read outside a batch holds no transaction open.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS astraea_jobs (
    job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, category TEXT NOT NULL,
    arrival_unix_s {real} NOT NULL, state TEXT NOT NULL, segment_index {int} NOT NULL,
    context_tokens {int} NOT NULL, generated_tokens {int} NOT NULL,
    finished_unix_s {real}, finish_reason TEXT, meta_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS astraea_jobs_by_finish ON astraea_jobs (finished_unix_s);
CREATE TABLE IF NOT EXISTS astraea_segments (
    job_id TEXT NOT NULL, segment {int} NOT NULL, tokens_emitted {int} NOT NULL,
    finish_reason TEXT, PRIMARY KEY (job_id, segment));
CREATE TABLE IF NOT EXISTS astraea_transcript (
    job_id TEXT NOT NULL, segment {int} NOT NULL, role TEXT NOT NULL, seq {int} NOT NULL,
    text TEXT, token_ids {blob}, PRIMARY KEY (job_id, segment, role, seq));
CREATE TABLE IF NOT EXISTS astraea_responses (
    response_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT,
    created_unix_s {real} NOT NULL, payload_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS astraea_responses_by_session ON astraea_responses (session_id);
CREATE TABLE IF NOT EXISTS astraea_blobs (
    name TEXT PRIMARY KEY, data {blob} NOT NULL, updated_unix_s {real} NOT NULL);
CREATE INDEX IF NOT EXISTS astraea_responses_by_created ON astraea_responses (created_unix_s);
CREATE TABLE IF NOT EXISTS astraea_gateway_sessions (
    session_id TEXT PRIMARY KEY, version {int} NOT NULL, holder TEXT NOT NULL,
    lease_until_unix_s {real} NOT NULL, last_used_unix_s {real} NOT NULL,
    state_json TEXT NOT NULL)
"""
# The last two were added without a version bump: IF NOT EXISTS creates them in a database
# written before them, and nothing else reads them.

_JOB_COLUMNS = ("job_id, owner, category, arrival_unix_s, state, segment_index, "
                "context_tokens, generated_tokens, finished_unix_s, finish_reason, meta_json")

_SESSION_COLUMNS = ("session_id, version, holder, lease_until_unix_s, last_used_unix_s, "
                    "state_json")

# Statements with `?` placeholders (rewritten per dialect). Upserts use ON CONFLICT, which
# SQLite (3.24+) and PostgreSQL (9.5+) both read the same way.
_SQL = {
    "put_job": f"INSERT INTO astraea_jobs ({_JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
               "ON CONFLICT (job_id) DO UPDATE SET owner=excluded.owner, "
               "category=excluded.category, arrival_unix_s=excluded.arrival_unix_s, "
               "state=excluded.state, segment_index=excluded.segment_index, "
               "context_tokens=excluded.context_tokens, "
               "generated_tokens=excluded.generated_tokens, "
               "finished_unix_s=excluded.finished_unix_s, "
               "finish_reason=excluded.finish_reason, meta_json=excluded.meta_json",
    "finish_job": "UPDATE astraea_jobs SET state=?, finished_unix_s=?, finish_reason=?, "
                  "generated_tokens=COALESCE(?, generated_tokens) WHERE job_id=?",
    "get_job": f"SELECT {_JOB_COLUMNS} FROM astraea_jobs WHERE job_id=?",
    "unfinished": f"SELECT {_JOB_COLUMNS} FROM astraea_jobs WHERE finished_unix_s IS NULL "
                  "ORDER BY arrival_unix_s, job_id",
    "prune_segments": "DELETE FROM astraea_segments WHERE job_id IN (SELECT job_id FROM "
                      "astraea_jobs WHERE finished_unix_s < ?)",
    "prune_transcript": "DELETE FROM astraea_transcript WHERE job_id IN (SELECT job_id FROM "
                        "astraea_jobs WHERE finished_unix_s < ?)",
    "prune_jobs": "DELETE FROM astraea_jobs WHERE finished_unix_s < ?",
    "progress": "INSERT INTO astraea_segments (job_id, segment, tokens_emitted, finish_reason) "
                "VALUES (?,?,?,?) ON CONFLICT (job_id, segment) DO UPDATE SET "
                "tokens_emitted=excluded.tokens_emitted, finish_reason=excluded.finish_reason",
    "get_segments": "SELECT segment, tokens_emitted, finish_reason FROM astraea_segments "
                    "WHERE job_id=? ORDER BY segment",
    "del_segments": "DELETE FROM astraea_segments WHERE job_id=?",
    "put_prompt": "INSERT INTO astraea_transcript (job_id, segment, role, seq, text, token_ids) "
                  "VALUES (?,?,'prompt',0,?,?) ON CONFLICT (job_id, segment, role, seq) "
                  "DO UPDATE SET text=excluded.text, token_ids=excluded.token_ids",
    # An output chunk is keyed by the offset of its first token in the segment's output: a
    # round run twice (after a lost connection) writes it once, and chunks sort in order.
    "append_output": "INSERT INTO astraea_transcript "
                     "(job_id, segment, role, seq, text, token_ids) VALUES (?,?,'output',?,NULL,?) "
                     "ON CONFLICT (job_id, segment, role, seq) DO UPDATE SET "
                     "token_ids=excluded.token_ids",
    "get_transcript": "SELECT segment, role, text, token_ids FROM astraea_transcript "
                      "WHERE job_id=? ORDER BY segment, role DESC, seq",  # prompt, output
    "del_transcript": "DELETE FROM astraea_transcript WHERE job_id=?",
    "put_response": "INSERT INTO astraea_responses "
                    "(response_id, owner, session_id, created_unix_s, payload_json) "
                    "VALUES (?,?,?,?,?) ON CONFLICT (response_id) DO UPDATE SET "
                    "owner=excluded.owner, session_id=excluded.session_id, "
                    "created_unix_s=excluded.created_unix_s, payload_json=excluded.payload_json",
    "get_response": "SELECT response_id, owner, session_id, created_unix_s, payload_json "
                    "FROM astraea_responses WHERE response_id=?",
    "del_response": "DELETE FROM astraea_responses WHERE response_id=?",
    "put_blob": "INSERT INTO astraea_blobs (name, data, updated_unix_s) VALUES (?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET data=excluded.data, "
                "updated_unix_s=excluded.updated_unix_s",
    "get_blob": "SELECT data FROM astraea_blobs WHERE name=?",
    "prune_responses": "DELETE FROM astraea_responses WHERE created_unix_s < ?",
    # Gateway sessions: every change is a compare-and-set on `version`; RETURNING tells the
    # caller whether it won (SQLite 3.35+, PostgreSQL).
    "get_session": f"SELECT {_SESSION_COLUMNS} FROM astraea_gateway_sessions "
                   "WHERE session_id=?",
    "insert_session": f"INSERT INTO astraea_gateway_sessions ({_SESSION_COLUMNS}) "
                      "VALUES (?,?,?,?,?,?) ON CONFLICT (session_id) DO NOTHING "
                      "RETURNING session_id",
    "swap_session": "UPDATE astraea_gateway_sessions SET version=?, holder=?, "
                    "lease_until_unix_s=?, last_used_unix_s=?, state_json=? "
                    "WHERE session_id=? AND version=? RETURNING session_id",
    "swap_session_nowait": "UPDATE astraea_gateway_sessions SET version=?, holder=?, "
                           "lease_until_unix_s=?, last_used_unix_s=?, state_json=? "
                           "WHERE session_id=? AND version=?",
    "del_session": "DELETE FROM astraea_gateway_sessions WHERE session_id=? AND version=? "
                   "RETURNING session_id",
    "stale_sessions": f"SELECT {_SESSION_COLUMNS} FROM astraea_gateway_sessions "
                      "WHERE (holder='' AND last_used_unix_s < ?) OR "
                      "(holder<>'' AND lease_until_unix_s < ?) "
                      "ORDER BY last_used_unix_s LIMIT ?",
}


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases: parameter style, column types, and how schema
    creation is serialized against another process doing the same."""

    name: str
    placeholder: str  # "?" or "%s"
    real: str
    int: str
    blob: str
    begin_schema: tuple[str, ...]  # statements opening the schema transaction
    pipeline: bool = False  # the connection has psycopg's pipeline() (send without waiting)



class SqlStore(Store):
    """Batched `Store` over one DB-API connection in autocommit mode (see module docstring).
    Takes ownership of `conn`; checks or creates the schema before returning."""

    def __init__(self, conn: Any, dialect: Dialect, url: str, *,
                 batch_interval_s: float = 0.01, batch_max_ops: int = 512,
                 on_close: Callable[[], None] | None = None,
                 reconnect: Callable[[], Any] | None = None,
                 lost: Callable[[Any, BaseException], bool] | None = None,
                 reconnect_timeout_s: float = 60.0,
                 writer: Callable[[Any], Any] | None = None) -> None:
        if not batch_interval_s >= 0:
            raise ValueError(f"batch_interval_s must be >= 0, got {batch_interval_s}")
        if not (isinstance(batch_max_ops, int) and batch_max_ops >= 1):
            raise ValueError(f"batch_max_ops must be a positive integer, got {batch_max_ops}")
        if not reconnect_timeout_s >= 0:
            raise ValueError(f"reconnect_timeout_s must be >= 0, got {reconnect_timeout_s}")
        self._conn, self._dialect, self._url = conn, dialect, url
        self._sql = {k: v.replace("?", dialect.placeholder) for k, v in _SQL.items()}
        self._update_sql: dict[tuple[str, ...], str] = {}  # update_job's, by columns set
        try:
            self._init_schema()
        except BaseException:
            try:
                conn.close()
            finally:
                if on_close is not None:
                    on_close()
            raise
        if writer is not None:  # another writer takes over from the schema's connection
            self._writer = writer(conn)
            return
        # The writer thread owns the connection from here on (writer.py).
        self._writer = BatchWriter(conn, url, interval_s=batch_interval_s,
                                   max_ops=batch_max_ops, pipeline=dialect.pipeline,
                                   reconnect=reconnect, lost=lost,
                                   reconnect_timeout_s=reconnect_timeout_s,
                                   name=f"store-writer-{dialect.name}", on_close=on_close)

    @property
    def url(self) -> str:
        return self._url

    # --- schema -------------------------------------------------------------------------------
    def _init_schema(self) -> None:
        c, d = self._conn, self._dialect
        try:
            for stmt in d.begin_schema:
                c.execute(stmt)
            c.execute("CREATE TABLE IF NOT EXISTS astraea_schema (version INTEGER NOT NULL)")
            rows = c.execute("SELECT version FROM astraea_schema").fetchall()
            if rows and (len(rows) != 1 or rows[0][0] != SCHEMA_VERSION):
                found = ", ".join(str(r[0]) for r in rows)
                c.execute("ROLLBACK")
                raise SchemaVersionError(
                    f"{self._url}: the state was written with schema version {found}; this "
                    f"build reads version {SCHEMA_VERSION}. Use another state directory or "
                    "database, or migrate it with the build that wrote it")
            for stmt in _SCHEMA.format(real=d.real, int=d.int, blob=d.blob).split(";"):
                c.execute(stmt)
            if not rows:
                c.execute(f"INSERT INTO astraea_schema (version) VALUES ({SCHEMA_VERSION})")
            c.execute("COMMIT")
        except SchemaVersionError:
            raise
        except Exception as e:
            raise StoreError(f"{self._url}: cannot set up the schema: {e}") from e

    # --- queued operations (writer.py runs them) ----------------------------------------------
    def _write(self, *statements: Statement) -> None:
        self._writer.put(WRITE, statements)

    def _read(self, key: str, params: tuple) -> list:
        return self._writer.put(READ, (self._sql[key], params)).result()

    # --- durability and life cycle ----------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        try:
            self._writer.put(FLUSH).result(timeout)
        except FutureTimeout:
            raise StoreError(f"{self._url}: flush did not complete in {timeout} s") from None

    async def flush_async(self) -> None:
        await self._writer.flush_async()

    def close(self) -> None:
        self._writer.close()

    async def close_async(self) -> None:
        await self._writer.close_async()

    @property
    def outage(self) -> str | None:
        return self._writer.outage

    @property
    def commits(self) -> int:
        """Transactions committed so far (every flush that found writes costs one)."""
        return self._writer.commits

    @property
    def statements(self) -> int:
        """Write statements committed so far."""
        return self._writer.statements

    def pending_writes(self) -> int:
        """Operations queued and not yet taken by the writer (a backlog gauge)."""
        return self._writer.pending()

    # --- jobs ---------------------------------------------------------------------------------
    def put_job(self, record: JobRecord) -> None:
        r = rec.check_job(record)
        self._write((self._sql["put_job"], (
            r.job_id, r.owner, r.category, float(r.arrival_unix_s), r.state, r.segment_index,
            r.context_tokens, r.generated_tokens,
            None if r.finished_unix_s is None else float(r.finished_unix_s), r.finish_reason,
            rec.to_json(r.meta, "meta"))))

    def update_job(self, job_id: str, **fields) -> None:
        rec.check_id(job_id, "job_id")
        columns = rec.check_update(fields)  # names from a fixed set: safe to put in the SQL
        names = tuple(columns)
        sql = self._update_sql.get(names)
        if sql is None:  # a few combinations recur (the control plane's updates): built once
            p = self._dialect.placeholder
            sets = ", ".join(f"{name}={p}" for name in names)
            sql = self._update_sql[names] = f"UPDATE astraea_jobs SET {sets} WHERE job_id={p}"
        self._write((sql, (*columns.values(), job_id)))

    def finish_job(self, job_id: str, *, finished_unix_s: float, reason: str,
                   state: str = "finished", generated_tokens: int | None = None,
                   keep_transcript: bool = False) -> None:
        rec.check_id(job_id, "job_id")
        rec.check_id(state, "state")
        when = rec.check_time(finished_unix_s, "finished_unix_s")
        rec.check_text(reason, "reason")
        if generated_tokens is not None:
            rec.check_count(generated_tokens, "generated_tokens")
        statements = [(self._sql["finish_job"], (state, when, reason, generated_tokens, job_id)),
                      (self._sql["del_segments"], (job_id,))]
        if not keep_transcript:
            statements.append((self._sql["del_transcript"], (job_id,)))
        self._write(*statements)

    def get_job(self, job_id: str) -> JobRecord | None:
        rec.check_id(job_id, "job_id")
        rows = self._read("get_job", (job_id,))
        return _job(rows[0]) if rows else None

    def load_unfinished(self) -> list[JobRecord]:
        return [_job(r) for r in self._read("unfinished", ())]

    def prune_finished(self, finished_before_unix_s: float) -> None:
        t = rec.check_time(finished_before_unix_s, "finished_before_unix_s")
        self._write((self._sql["prune_segments"], (t,)), (self._sql["prune_transcript"], (t,)),
                    (self._sql["prune_jobs"], (t,)))

    # --- segments and transcripts -------------------------------------------------------------
    def segment_progress(self, job_id: str, segment: int, tokens_emitted: int,
                         finish_reason: str | None = None) -> None:
        rec.check_id(job_id, "job_id")
        rec.check_count(segment, "segment")
        rec.check_count(tokens_emitted, "tokens_emitted")
        if finish_reason is not None:
            rec.check_text(finish_reason, "finish_reason")
        self._write((self._sql["progress"], (job_id, segment, tokens_emitted, finish_reason)))

    def get_segments(self, job_id: str) -> list[SegmentProgress]:
        rec.check_id(job_id, "job_id")
        return [SegmentProgress(int(s), int(n), f)
                for s, n, f in self._read("get_segments", (job_id,))]

    def put_prompt(self, job_id: str, segment: int, prompt: str | Sequence[int]) -> None:
        rec.check_id(job_id, "job_id")
        rec.check_count(segment, "segment")
        if isinstance(prompt, str):
            text, ids = rec.check_text(prompt, "prompt"), None
        else:
            text, ids = None, rec.pack_ids(prompt, "prompt")
        self._write((self._sql["put_prompt"], (job_id, segment, text, ids)))

    def append_output(self, job_id: str, segment: int, token_ids: Sequence[int], *,
                      at: int) -> None:
        rec.check_id(job_id, "job_id")
        rec.check_count(segment, "segment")
        rec.check_count(at, "at")
        data = rec.pack_ids(token_ids)
        if data:
            self._write((self._sql["append_output"], (job_id, segment, at, data)))

    def get_transcript(self, job_id: str) -> list[TranscriptPiece]:
        rec.check_id(job_id, "job_id")
        return _merge_outputs(self._read("get_transcript", (job_id,)))

    # --- responses and blobs ------------------------------------------------------------------
    def put_response(self, response: StoredResponse) -> None:
        r = rec.check_response(response)
        self._write((self._sql["put_response"], (
            r.response_id, r.owner, r.session_id, float(r.created_unix_s),
            rec.to_json(r.payload, "payload"))))

    def get_response(self, response_id: str) -> StoredResponse | None:
        rec.check_id(response_id, "response_id")
        rows = self._read("get_response", (response_id,))
        if not rows:
            return None
        rid, owner, session, created, payload = rows[0]
        return StoredResponse(rid, owner, session, float(created), json.loads(payload))

    def delete_response(self, response_id: str) -> None:
        rec.check_id(response_id, "response_id")
        self._write((self._sql["del_response"], (response_id,)))

    def put_blob(self, name: str, data: bytes) -> None:
        rec.check_id(name, "blob name")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"blob {name!r}: data must be bytes, got {type(data).__name__}")
        self._write((self._sql["put_blob"], (name, bytes(data), time.time())))

    def get_blob(self, name: str) -> bytes | None:
        rec.check_id(name, "blob name")
        rows = self._read("get_blob", (name,))
        return bytes(rows[0][0]) if rows else None


    def prune_responses(self, created_before_unix_s: float) -> None:
        t = rec.check_time(created_before_unix_s, "created_before_unix_s")
        self._write((self._sql["prune_responses"], (t,)))

    # --- gateway sessions ---------------------------------------------------------------------
    def get_session(self, session_id: str) -> GatewaySession | None:
        rec.check_id(session_id, "session_id")
        rows = self._read("get_session", (session_id,))
        return _session(rows[0]) if rows else None

    def put_session(self, session: GatewaySession, expected_version: int | None) -> bool:
        s = rec.check_session(session)
        values = (s.version, s.holder, float(s.lease_until_unix_s),
                  float(s.last_used_unix_s), rec.to_json(s.state, "state"))
        if expected_version is None:
            return bool(self._read("insert_session", (s.session_id, *values)))
        rec.check_count(expected_version, "expected_version")
        return bool(self._read("swap_session", (*values, s.session_id, expected_version)))

    def put_session_nowait(self, session: GatewaySession, expected_version: int) -> None:
        s = rec.check_session(session)
        rec.check_count(expected_version, "expected_version")
        self._write((self._sql["swap_session_nowait"], (
            s.version, s.holder, float(s.lease_until_unix_s), float(s.last_used_unix_s),
            rec.to_json(s.state, "state"), s.session_id, expected_version)))

    def delete_session(self, session_id: str, expected_version: int) -> bool:
        rec.check_id(session_id, "session_id")
        rec.check_count(expected_version, "expected_version")
        return bool(self._read("del_session", (session_id, expected_version)))

    def stale_sessions(self, used_before_unix_s: float, now_unix_s: float,
                       limit: int = 100) -> list[GatewaySession]:
        used = rec.check_time(used_before_unix_s, "used_before_unix_s")
        now = rec.check_time(now_unix_s, "now_unix_s")
        rec.check_count(limit, "limit")
        return [_session(r) for r in self._read("stale_sessions", (used, now, limit))]


def _job(row: Sequence) -> JobRecord:
    (job_id, owner, category, arrival, state, seg, ctx, gen, finished, reason, meta) = row
    return JobRecord(job_id=job_id, owner=owner, category=category,
                     arrival_unix_s=float(arrival), state=state, segment_index=int(seg),
                     context_tokens=int(ctx), generated_tokens=int(gen),
                     finished_unix_s=None if finished is None else float(finished),
                     finish_reason=reason, meta=json.loads(meta))


def _session(row: Sequence) -> GatewaySession:
    session_id, version, holder, lease, used, state = row
    return GatewaySession(session_id, int(version), holder, float(lease), float(used),
                          json.loads(state))


def _merge_outputs(rows: list) -> list[TranscriptPiece]:
    """Rows (segment, role, text, ids) ordered by segment, prompt before output, chunk order
    → one piece per prompt and one per segment's output (its chunks joined)."""
    pieces: list[TranscriptPiece] = []
    chunks: list[bytes] = []
    chunk_segment = -1

    def end_output() -> None:
        if chunks:
            ids = rec.unpack_ids(b"".join(chunks))
            pieces.append(TranscriptPiece(chunk_segment, "output", token_ids=tuple(ids)))
            chunks.clear()

    for segment, role, text, data in rows:
        segment = int(segment)
        if role == "output":
            if segment != chunk_segment:
                end_output()
                chunk_segment = segment
            chunks.append(bytes(data))
            continue
        end_output()
        pieces.append(TranscriptPiece(segment, "prompt", text=text, token_ids=None
                                      if data is None else tuple(rec.unpack_ids(data))))
    end_output()
    return pieces
