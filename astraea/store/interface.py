"""`Store`: the contract every durable-state backend keeps (SQLite and PostgreSQL today).

Writes are queued and return at once; a single writer commits them in batches (every few
milliseconds or every few hundred writes, whichever comes first). So:

* **Durability window.** A write is durable once `flush()` (or `flush_async()`) issued after
  it returns. A process killed before that (SIGKILL, OOM) loses at most the writes of the
  batch still open: the last `batch_interval_s` or `batch_max_ops` writes, never part of one
  (a batch commits whole or not at all). On SQLite with `synchronous=NORMAL` a committed batch
  survives the process (it is in the WAL file, in the kernel's page cache); a power loss of
  the machine may undo the batches committed since the WAL was last synced (at a checkpoint),
  never corrupting the file. On PostgreSQL with its default `synchronous_commit=on` a
  committed batch survives both.
* **Read your writes.** Reads go through the same writer, after every write queued before
  them (a read commits the batch before it): a caller always sees its own writes.
* **Bad input** raises `ValueError`/`TypeError` in the caller, before anything is queued. A
  failure of the database itself (disk full, a corrupt file) makes the store unusable: that
  call and every later one raise `StoreError` saying what happened.
* **A lost connection** (PostgreSQL: the server restarted) is not a failure: the store
  reconnects with backoff and commits the batch that was cut, for a bounded time. Meanwhile
  writes and flushes wait, reads raise `StoreError` at once, and `outage` says why; past the
  bound the store fails as above.
* Any thread may call any method; writes from one thread are applied in the order made. (A
  SQLite store opened with `writer="process"` is the exception: one thread, its event loop's.)
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from astraea.store.records import (
    GatewaySession,
    JobRecord,
    SegmentProgress,
    StoredResponse,
    TranscriptPiece,
)


class Store(ABC):
    """Durable state of the services: jobs (with their segments' progress and transcripts),
    the gateway's stored Responses, and named blobs (the predictor's state)."""

    # --- jobs -------------------------------------------------------------------------------
    @abstractmethod
    def put_job(self, record: JobRecord) -> None:
        """Create the job, or replace every field of one with the same id (recovery may
        write a job again)."""

    @abstractmethod
    def update_job(self, job_id: str, **fields) -> None:
        """Set some of `records.UPDATABLE_FIELDS` (state, segment_index, context_tokens,
        generated_tokens, meta). A job that is not stored is left absent (no error: the write
        is applied after the call returns)."""

    @abstractmethod
    def finish_job(self, job_id: str, *, finished_unix_s: float, reason: str,
                   state: str = "finished", generated_tokens: int | None = None,
                   keep_transcript: bool = False) -> None:
        """The job is over: record when, why and its final state. Its segments' progress and
        (unless `keep_transcript`) its transcript are deleted: only a running job needs them."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None:
        """The job, finished or not; None if never stored (or pruned)."""

    @abstractmethod
    def load_unfinished(self) -> list[JobRecord]:
        """Every job not finished, oldest arrival first: what a restarted control plane
        recovers."""

    @abstractmethod
    def prune_finished(self, finished_before_unix_s: float) -> None:
        """Delete the jobs that finished before this time (the retention of finished jobs)."""

    # --- segments and transcripts -------------------------------------------------------------
    @abstractmethod
    def segment_progress(self, job_id: str, segment: int, tokens_emitted: int,
                         finish_reason: str | None = None) -> None:
        """Segment `segment` of the job has streamed `tokens_emitted` tokens to its client
        (and ended, with `finish_reason`)."""

    @abstractmethod
    def get_segments(self, job_id: str) -> list[SegmentProgress]:
        """The job's recorded segments, in order."""

    @abstractmethod
    def put_prompt(self, job_id: str, segment: int, prompt: str | Sequence[int]) -> None:
        """The prompt of segment `segment` as the client sent it: text or token ids. Putting
        it again replaces it."""

    @abstractmethod
    def append_output(self, job_id: str, segment: int, token_ids: Sequence[int], *,
                      at: int) -> None:
        """Token ids segment `segment` generated, the first at offset `at` of its output.
        Chunks join in offset order; a chunk at an offset already stored replaces it (so a
        batch written twice after a lost connection stores it once)."""

    @abstractmethod
    def get_transcript(self, job_id: str) -> list[TranscriptPiece]:
        """The job's history in order: per segment its prompt, then its output (one piece
        with every appended chunk)."""

    # --- the gateway's stored Responses -------------------------------------------------------
    @abstractmethod
    def put_response(self, response: StoredResponse) -> None:
        """Store (or replace) a Response by its id."""

    @abstractmethod
    def get_response(self, response_id: str) -> StoredResponse | None:
        """The Response; None if unknown. Checking its owner is the caller's job."""

    @abstractmethod
    def delete_response(self, response_id: str) -> None: ...

    @abstractmethod
    def prune_responses(self, created_before_unix_s: float) -> None:
        """Delete the Responses created before this time (their retention)."""

    # --- the gateway's shared sessions ----------------------------------------------------------
    @abstractmethod
    def get_session(self, session_id: str) -> GatewaySession | None: ...

    @abstractmethod
    def put_session(self, session: GatewaySession, expected_version: int | None) -> bool:
        """Write `session` if the stored one has `expected_version` (None: if none is stored);
        whether it was written. Committed with the current batch; visible to other processes
        once that commits (`flush`)."""

    @abstractmethod
    def put_session_nowait(self, session: GatewaySession, expected_version: int) -> None:
        """`put_session` queued like any write: the caller does not learn whether it won."""

    @abstractmethod
    def delete_session(self, session_id: str, expected_version: int) -> bool:
        """Delete the session if it still has `expected_version`; whether it did."""

    @abstractmethod
    def stale_sessions(self, used_before_unix_s: float, now_unix_s: float,
                       limit: int = 100) -> list[GatewaySession]:
        """Sessions nobody holds and last used before `used_before_unix_s`, and sessions whose
        holder's lease ended before `now_unix_s`; the least recently used first."""

    # --- blobs --------------------------------------------------------------------------------
    @abstractmethod
    def put_blob(self, name: str, data: bytes) -> None:
        """Store (or replace) bytes under a name, e.g. the predictor's state."""

    @abstractmethod
    def get_blob(self, name: str) -> bytes | None: ...

    # --- durability and life cycle ------------------------------------------------------------
    @abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Block until every write queued before the call is committed (durable); StoreError
        if that takes longer than `timeout` seconds."""

    async def flush_async(self) -> None:
        """`flush` for an asyncio caller: the event loop keeps running while it waits."""
        await asyncio.to_thread(self.flush)

    @abstractmethod
    def close(self) -> None:
        """Commit what is queued and release the database. Idempotent."""

    async def close_async(self) -> None:
        """`close` for an asyncio caller."""
        await asyncio.to_thread(self.close)

    @property
    def outage(self) -> str | None:
        """Why the database is unreachable while the store reconnects to it (a message for
        the callers it turns away); None when it is reachable."""
        return None

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the state lives (a path, or the database URL without its password)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
