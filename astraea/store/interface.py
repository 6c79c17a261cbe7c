"""`Store`: the contract every durable-state backend keeps (SQLite and PostgreSQL today).

Writes are queued and return at once; a single writer commits them in batches (every few
milliseconds or every few hundred writes, whichever comes first). So:

* **Durability window.** A write is durable once `flush()` (or `flush_async()`) issued after
  it returns. A process killed before that (SIGKILL, OOM) loses at most the writes of the
  batch still open: the last `batch_interval_s` or `batch_max_ops` writes, never part of one
  (a batch commits whole or not at all). On SQLite with `synchronous=NORMAL` a committed batch
  also survives the process but not a power loss of the machine; on PostgreSQL with its
  default `synchronous_commit=on` it survives both.
* **Read your writes.** Reads go through the same writer, after every write queued before
  them, inside the batch not yet committed: a caller always sees its own writes, committed or
  not.
* **Bad input** raises `ValueError`/`TypeError` in the caller, before anything is queued. A
  failure of the database itself (disk full, connection lost) makes the store unusable: that
  call and every later one raise `StoreError` saying what happened.
* Any thread may call any method; writes from one thread are applied in the order made.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from astraea.store.records import (
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
    def append_output(self, job_id: str, segment: int, token_ids: Sequence[int]) -> None:
        """Token ids segment `segment` generated, appended after those appended before."""

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

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the state lives (a path, or the database URL without its password)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
