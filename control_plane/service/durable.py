"""Durable state of the control plane: what a restart must not lose, in a `Store`.

What is written, and when (the store batches its writes; `flush` makes them durable):

* StartJob: the job (`put_job`), flushed before the answer: an accepted job is durable.
* RunSegment accepted: its prompt (a stored prompt for the job's current segment is what
  says the segment was accepted: no state is written for it); tokens streamed: appended to the
  transcript (its length is the segment's progress); segment end: its progress and finish
  reason, the job's state, segment count, context and token totals; tool call START/END: the
  job's meta. None of these waits for a commit (the event gate below does).
* EndJob / CancelJob / a job ending otherwise: `finish_job` (flushed before EndJob and
  CancelJob answer).

Coalescing. The job's row and its output are written often (three row updates and a few
token chunks per segment), and each write costs the event loop and the store a little. So
row updates and output chunks wait in `_rows` / `_chunks` until the gate next runs (at once,
on the loop's next turn) and go to the store merged: one update per job with the latest value
of each field set since (exactly what the updates would have left, one after the other), one
chunk per segment with the tokens streamed since. Everything merged is queued before the
flush that releases the events after it, so the gate's promise holds; a job's pending writes
are queued before its `finish_job` and before any read of it.

The event gate. A client must never have seen something the store could lose, or a resumed
stream could not continue where the client stands. So every RunSegment event (tokens, done)
of a durable control plane waits in `_pending` until a flush issued after its writes returns;
one flush releases everything that queued meanwhile (a group commit: one commit per round,
whatever the number of streams).

A database that goes away (PostgreSQL restarting): the store reconnects for a bounded time and
commits what was queued (astraea/store/writer.py). Meanwhile StartJob is refused UNAVAILABLE
with the store's reason (a job is accepted only if it can be made durable), EndJob and
CancelJob too once the outage is noticed (their writes stay queued and land on reconnection),
and streams hold their events: tokens keep being generated and queued, and reach their clients
once committed. If the database stays away past the bound, the store fails for good: streams
go on without durability, and new jobs are refused.

Recovery (`restore`, at start): every unfinished job comes back with its KV gone (DISCARDED)
and on no worker. One in its API wait stays there; one whose segment was running (or queued)
waits for its client to send that segment's RunSegment again, with `resume_from_index` = the
tokens it received: the stream then replays the stored tokens from there and generation
continues from the stored transcript (prompt and output so far) with what is left of the
segment's budget. Without `resume_from_index` the stream starts at 0 (every stored token, then
the rest). A job that was waiting for its first segment simply waits for it. A resumed
segment's remaining tokens are the engine's continuation of the stored transcript: the
simulated engine's are exactly those of an uncut run; a real model's, sampled again, may differ
from what the cut run would have produced (none repeats or is skipped). Replayed tokens carry
their ids only: the store keeps no detokenized text (their TokenEvent.text is empty).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from astraea.errors import InvalidRequest
from astraea.plan import JobState
from astraea.store import JobRecord, Store, StoreError
from astraea.telemetry import get_logger
from astraea.v1 import agent_pb2, common_pb2
from control_plane.core.job import Job
from control_plane.service.registry import JobEntry, SegmentCall

log = get_logger("astraea.control_plane.durable")

PRUNE_INTERVAL_S = 60.0  # how often finished jobs past the retention are deleted
OUTAGE_POLL_S = 0.1  # how often a flush that takes long looks whether the database is gone


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning


@dataclass
class CutSegment:
    """A segment that was running (or queued) when the previous process died."""

    index: int
    output: list[int]  # the tokens stored for it (streamed to its client, or about to be)


class Durability:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.cut: dict[str, CutSegment] = {}  # restored jobs whose segment must be resumed
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._wake = asyncio.Event()
        self._last_prune = 0.0
        self.failed: StoreError | None = None
        self.stopping = False  # set when the process stops: see job_finished
        self._last_segment: dict[str, tuple[int, int, str]] = {}  # see segment_ended
        # Writes waiting to be merged (see "Coalescing" above): job id -> fields to set;
        # (job id, segment) -> [offset of the first token, the tokens since].
        self._rows: dict[str, dict] = {}
        self._chunks: dict[tuple[str, int], list] = {}

    # --- writes -------------------------------------------------------------------------
    def job_started(self, entry: JobEntry) -> None:
        """StoreError while the database is unreachable: a job is accepted only if it can be
        made durable now (its StartJob gets UNAVAILABLE, saying why)."""
        outage = self.store.outage
        if outage is not None:
            raise StoreError(outage)
        job = entry.job
        self.store.put_job(JobRecord(job_id=job.job_id, owner=entry.owner, category=job.category,
                                     arrival_unix_s=entry.arrival_unix_s, state="arrived",
                                     meta={"client": entry.client}))

    def segment_accepted(self, entry: JobEntry, seg: SegmentCall) -> None:
        job_id = entry.job.job_id
        req = seg.request
        prompt = (req.prompt_text if req.WhichOneof("input") == "prompt_text"
                  else list(req.prompt_token_ids.ids))
        self.store.put_prompt(job_id, seg.index, prompt)  # accepted: see restore

    def tokens(self, entry: JobEntry, seg: SegmentCall, ids: list[int]) -> None:
        """`ids` were just streamed (`seg.next_index` already counts them). The stored
        output's length is the segment's progress (its segment_progress row is written at its
        end only)."""
        key, at = (entry.job.job_id, seg.index), seg.next_index - len(ids)
        chunk = self._chunks.get(key)
        if chunk is None:
            self._chunks[key] = [at, list(ids)]
            self._wake.set()
        elif chunk[0] + len(chunk[1]) == at:
            chunk[1].extend(ids)
        else:  # not contiguous (a resumed segment): the stored chunks stay keyed by offset
            self.store.append_output(key[0], key[1], chunk[1], at=chunk[0])
            self._chunks[key] = [at, list(ids)]

    def segment_ended(self, entry: JobEntry, seg: SegmentCall, finish_reason: int) -> None:
        job = entry.job
        reason = common_pb2.FinishReason.Name(finish_reason)
        self.store.segment_progress(job.job_id, seg.index, seg.next_index, reason)
        if job.state is JobState.FINISHED:  # its last segment: see job_finished
            self._last_segment[job.job_id] = (seg.index, seg.next_index, reason)
        self._update(job.job_id, state=job.state.value, segment_index=job.segment_index,
                     context_tokens=job.context_tokens, generated_tokens=entry.generated_total)

    def tool_reported(self, entry: JobEntry, category: str) -> None:
        """A tool call opened (START) or closed (END: `entry.tool_started_s` is None)."""
        self._update(entry.job.job_id, meta={
            "client": entry.client, "tool_open": entry.tool_started_s is not None,
            "tool_category": category})

    def _update(self, job_id: str, **fields) -> None:
        row = self._rows.get(job_id)
        if row is None:
            self._rows[job_id] = fields
            self._wake.set()
        else:
            row.update(fields)

    def drain(self) -> None:
        """Queue the merged writes in the store."""
        rows, self._rows = self._rows, {}
        chunks, self._chunks = self._chunks, {}
        for job_id, fields in rows.items():
            self.store.update_job(job_id, **fields)
        for (job_id, segment), (at, ids) in chunks.items():
            self.store.append_output(job_id, segment, ids, at=at)

    def job_finished(self, entry: JobEntry, reason: str, error: bool) -> None:
        if self.stopping and error:
            # Ended by the stop itself (its RunSegment call cancelled): it stays unfinished
            # in the store, and its client resumes it with the next process.
            return
        job_id = entry.job.job_id
        self.cut.pop(job_id, None)
        # A job ended by its last segment keeps that segment (transcript and end) until it
        # is pruned: its client may not have had the done event yet, and resume it.
        last = self._last_segment.pop(job_id, None)
        try:
            self.drain()  # its own writes land before its end, not after
            self.store.finish_job(job_id, finished_unix_s=entry.finished_unix_s,
                                  reason=reason, state=JobState.FINISHED.value,
                                  generated_tokens=entry.generated_total,
                                  keep_transcript=last is not None)
            if last is not None:
                self.store.segment_progress(job_id, *last)
        except StoreError as e:  # finish_job runs from sync paths: log, the next flush fails
            self._failed(e)

    async def flush(self) -> None:
        """Every write so far is durable (StoreError if the store failed). A caller that
        answers a client (StartJob, EndJob, CancelJob) is not kept waiting through an outage:
        StoreError as soon as the database is found unreachable; its writes stay queued and
        commit when the store reconnects."""
        outage = self.store.outage
        if outage is not None:
            raise StoreError(outage)
        self.drain()
        done = asyncio.ensure_future(self.store.flush_async())
        while True:
            finished, _ = await asyncio.wait((done,), timeout=OUTAGE_POLL_S)
            if finished:
                return done.result()
            outage = self.store.outage
            if outage is not None:
                done.add_done_callback(_consume)  # its outcome no longer matters to anyone
                raise StoreError(outage)

    def prune(self, retention_s: float) -> None:
        """Delete jobs finished longer than `retention_s` ago (rate-limited)."""
        now = time.time()
        if now - self._last_prune >= PRUNE_INTERVAL_S:
            self._last_prune = now
            try:
                self.store.prune_finished(now - retention_s)
            except StoreError as e:
                self._failed(e)

    def expire_cut(self, cp, now: float) -> None:
        """End restored jobs whose client did not come back to resume their cut segment
        within the API-wait timeout (`now`: time.monotonic()), as abandoned API waits are."""
        timeout = cp.config.api_wait_timeout_s
        if not timeout > 0:
            return
        for job_id in list(self.cut):
            entry = cp.registry.jobs.get(job_id)
            if entry is not None and now - entry.last_call_s > timeout:
                cp.finish_job(entry, f"its client did not resume its cut segment within "
                              f"{timeout:g} s of the restart", cancel=True, error=True)

    def _failed(self, e: StoreError) -> None:
        if self.failed is None:
            self.failed = e
            log.error("durable state failed: jobs accepted from now on are not durable",
                      error=str(e))

    # --- the event gate -----------------------------------------------------------------
    def emit(self, queue: asyncio.Queue, event: object) -> None:
        """Queue a RunSegment event for delivery once the writes before it are durable."""
        self._pending.append((queue, event))
        self._wake.set()

    async def run_gate(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            try:
                self.drain()
                if batch and self.failed is None:  # writes alone commit on the store's timer
                    await self.store.flush_async()
            except StoreError as e:  # streams go on; durability is lost, say so once
                self._failed(e)
            for queue, event in batch:
                queue.put_nowait(event)

    # --- recovery -----------------------------------------------------------------------
    def restore(self, cp) -> int:
        """Put every unfinished job of the store back into `cp` (its scheduler and registry);
        returns how many."""
        now, wall = cp.now(), time.time()
        records = self.store.load_unfinished()
        for record in records:
            self._restore_one(cp, record, now, wall)
        return len(records)

    def _restore_one(self, cp, r: JobRecord, now: float, wall: float) -> None:
        pieces = self.store.get_transcript(r.job_id)
        # Its current segment was accepted (its prompt stored) and had not ended. The state
        # says so too in a store written by an earlier build.
        running = r.state in (JobState.READY.value, JobState.RUNNING.value) or any(
            p.segment == r.segment_index and p.role == "prompt" for p in pieces)
        api_wait = r.state == JobState.API_WAIT.value and not running
        # Scheduler time restarts at 0 with the process: the arrival keeps its age.
        arrival = now - max(0.0, wall - r.arrival_unix_s) / cp.config.time_scale
        job = cp.scheduler.job_restored(r.job_id, arrival, r.category or "unknown",
                                        r.segment_index, r.context_tokens, api_wait, now)
        client = str(r.meta.get("client", ""))
        entry = JobEntry(job=job, arrival_unix_s=r.arrival_unix_s, client=client,
                         owner=r.owner, generated_total=r.generated_tokens)
        for p in pieces:
            if running or p.segment < r.segment_index:  # an unended segment's pieces: stale
                entry.transcript.append(
                    p.text if p.text is not None else
                    list(p.token_ids or ()) if p.role == "output" else tuple(p.token_ids or ()))
        if running:
            out = [p for p in pieces if p.segment == r.segment_index and p.role == "output"]
            output = list(out[0].token_ids) if out else []
            if output:
                entry.output = entry.transcript[-1]
            entry.generated_total += len(output)
            self.cut[r.job_id] = CutSegment(r.segment_index, output)
        if api_wait and r.meta.get("tool_open"):
            entry.tool_started_s = now  # the END may come after the restart
            job.next_tool_category = r.meta.get("tool_category") or job.next_tool_category
        cp.registry.jobs[r.job_id] = entry
        cp.registry.unfinished_by_client[client] += 1
        cp.tracing.job_started(job, None)
        log.info("job restored", job_id=r.job_id, state=r.state, segment=r.segment_index,
                 stored_tokens=len(self.cut[r.job_id].output) if running else 0)

    def finished_entry(self, cp, job_id: str) -> JobEntry | None:
        """A job that finished before the restart, within the retention window, back in the
        registry as finished (so GetJob, EndJob and CancelJob answer as before); None if the
        store has no such job."""
        try:
            r = self.store.get_job(job_id)
        except (StoreError, ValueError):
            return None
        wall = time.time()
        if r is None or r.finished_unix_s is None \
                or r.finished_unix_s < wall - cp.config.finished_retention_s:
            return None
        now = cp.now()
        age = lambda t: max(0.0, wall - t) / cp.config.time_scale  # noqa: E731
        job = Job(job_id=job_id, arrival_s=now - age(r.arrival_unix_s),
                  category=r.category or "unknown", state=JobState.FINISHED,
                  segment_index=r.segment_index, context_tokens=r.context_tokens,
                  finished_s=now - age(r.finished_unix_s))
        entry = JobEntry(job=job, arrival_unix_s=r.arrival_unix_s,
                         client=str(r.meta.get("client", "")), owner=r.owner,
                         finished_unix_s=r.finished_unix_s, generated_total=r.generated_tokens)
        cp.registry.jobs[job_id] = entry
        cp.registry.finished[job_id] = time.monotonic()
        return entry

    # --- resuming a cut segment ---------------------------------------------------------
    def resume_point(self, entry: JobEntry, request) -> int:
        """Tokens already stored for the segment `request` resumes (0: a new segment);
        InvalidRequest if its `resume_from_index` is beyond them."""
        cut = self.cut.get(entry.job.job_id)
        k = request.resume_from_index if request.HasField("resume_from_index") else 0
        if cut is None:
            if k:
                raise InvalidRequest(f"resume_from_index is {k} but the job has no segment "
                                     "cut short to resume")
            return 0
        if k > len(cut.output):
            raise InvalidRequest(f"resume_from_index {k} is beyond the {len(cut.output)} "
                                 f"tokens stored for segment {cut.index}")
        return len(cut.output)

    def resumed(self, entry: JobEntry, seg: SegmentCall, request) -> None:
        """`seg` continues the cut segment: its stored tokens count as generated and
        streamed, its prompt is in the transcript, and the tokens the client has not seen
        are queued first."""
        cut = self.cut.pop(entry.job.job_id, None)
        if cut is None:
            return
        n = len(cut.output)
        seg.index = cut.index
        seg.generated = seg.next_index = seg.admission_base = n
        seg.admitted = True  # the prompt is in the restored transcript
        k = request.resume_from_index if request.HasField("resume_from_index") else 0
        if n > k:  # already durable: straight to the stream
            seg.events.put_nowait(agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(
                first_index=k, token_ids=cut.output[k:])))

    def replay_ended(self, entry: JobEntry, request) -> list[agent_pb2.RunSegmentEvent] | None:
        """A resume of the job's last segment, which ended (stored) but whose done event the
        client did not get: its tokens from `resume_from_index`, then a done. None if
        `request` is not such a resume."""
        job = entry.job
        # With 0 tokens received, a resume on a job in its API wait may as well be the next
        # segment's first attempt (lost before it was stored): that is what it is taken for.
        # A finished job has no next segment.
        if (not request.HasField("resume_from_index") or job.job_id in self.cut
                or job.segment_index == 0
                or not (job.state is JobState.FINISHED or (
                    job.state is JobState.API_WAIT and request.resume_from_index > 0))):
            return None
        last = job.segment_index - 1
        self.drain()  # a read sees the writes queued before it
        segs = [s for s in self.store.get_segments(job.job_id) if s.segment == last]
        if not segs or segs[0].finish_reason is None:
            return None
        out = [p for p in self.store.get_transcript(job.job_id)
               if p.segment == last and p.role == "output"]
        ids = list(out[0].token_ids) if out else []
        k = request.resume_from_index
        if k > len(ids):
            raise InvalidRequest(f"resume_from_index {k} is beyond the {len(ids)} tokens of "
                                 f"segment {last}")
        events = []
        if len(ids) > k:
            events.append(agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(
                first_index=k, token_ids=ids[k:])))
        events.append(agent_pb2.RunSegmentEvent(done=agent_pb2.SegmentDone(
            finish_reason=common_pb2.FinishReason.Value(segs[0].finish_reason),
            segment_index=last)))
        return events
