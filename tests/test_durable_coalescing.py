"""`Durability`'s write coalescing, on a real SQLite store: the writes a job makes between two
turns of the event gate reach the store merged (one row update, one output chunk), leave the
store exactly as the writes one by one would have, are queued before the flush that releases
the events after them, and are not left behind by a job's end or the process stopping."""

from __future__ import annotations

import asyncio
import time

from astraea.plan import JobState
from astraea.store import open_store
from astraea.v1 import agent_pb2, common_pb2
from control_plane.core.job import Job
from control_plane.service.durable import Durability
from control_plane.service.registry import JobEntry, SegmentCall


class CountingStore:
    """The store, with the number of calls each write method received."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, {"update_job": 0, "append_output": 0}

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if name not in self.calls:
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


def _entry(job_id: str) -> JobEntry:
    return JobEntry(job=Job(job_id=job_id, arrival_s=0.0, category="qa"),
                    arrival_unix_s=time.time(), client="127.0.0.1")


def _segment(index: int) -> SegmentCall:
    request = agent_pb2.RunSegmentRequest(
        job_id="j", prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]))
    return SegmentCall(index=index, new_tokens=3, max_tokens=16,
                       sampling=common_pb2.SamplingParams(max_tokens=16), request=request,
                       calls_tool=True, tool_category="search", submitted_s=0.0,
                       wait_before=0.0)


def _stream(durable: Durability, entry: JobEntry, seg: SegmentCall, ids: list[int]) -> None:
    seg.next_index += len(ids)
    entry.generated_total += len(ids)
    durable.tokens(entry, seg, ids)


def test_a_turns_writes_reach_the_store_merged_and_as_if_one_by_one(tmp_path):
    asyncio.run(_merged(tmp_path))


async def _merged(tmp_path) -> None:
    store = CountingStore(open_store(tmp_path))
    durable = Durability(store)
    gate = asyncio.create_task(durable.run_gate())
    try:
        entry = _entry("j")
        durable.job_started(entry)
        await durable.flush()
        seg = _segment(0)
        durable.segment_accepted(entry, seg)
        # Three chunks and an event in one turn of the loop: one chunk reaches the store,
        # committed before the event is released.
        for ids in ([5, 6], [7], [8, 9, 10]):
            _stream(durable, entry, seg, ids)
        events: asyncio.Queue = asyncio.Queue()
        durable.emit(events, "tokens")
        assert await asyncio.wait_for(events.get(), 10) == "tokens"
        assert store.calls["append_output"] == 1
        assert [p.token_ids for p in store.get_transcript("j") if p.role == "output"] == [
            (5, 6, 7, 8, 9, 10)]

        # The segment's end and a tool call opened and closed in the same turn: one update,
        # leaving what the three would have left one after the other.
        entry.job.state, entry.job.segment_index, entry.job.context_tokens = (
            JobState.API_WAIT, 1, 9)
        durable.segment_ended(entry, seg, common_pb2.FINISH_REASON_TOOL_CALL)
        entry.tool_started_s = 1.0
        durable.tool_reported(entry, "search")
        entry.tool_started_s = None
        durable.tool_reported(entry, "search")
        before = store.calls["update_job"]
        durable.emit(events, "done")
        assert await asyncio.wait_for(events.get(), 10) == "done"
        assert store.calls["update_job"] == before + 1
        row = store.get_job("j")
        assert (row.state, row.segment_index, row.context_tokens, row.generated_tokens) == (
            "api_wait", 1, 9, 6)
        assert row.meta == {"client": "127.0.0.1", "tool_open": False, "tool_category": "search"}

        # A write with no event after it is queued on the gate's next turn all the same.
        entry.tool_started_s = 2.0
        durable.tool_reported(entry, "search")
        await asyncio.sleep(0.05)
        store.flush()
        assert store.get_job("j").meta["tool_open"] is True
    finally:
        gate.cancel()
        store.close()


def test_a_jobs_pending_writes_land_before_its_end_and_at_stop(tmp_path):
    store = open_store(tmp_path)
    durable = Durability(store)  # no gate running: only finish and drain queue the writes
    try:
        entry = _entry("j")
        durable.job_started(entry)
        seg = _segment(0)
        durable.segment_accepted(entry, seg)
        _stream(durable, entry, seg, [5, 6, 7])
        entry.job.state, entry.job.segment_index = JobState.API_WAIT, 1
        durable.segment_ended(entry, seg, common_pb2.FINISH_REASON_TOOL_CALL)
        # Cancelled in its API wait before the gate ran: its end must come after its writes,
        # which would otherwise bring back its state and the transcript the end deletes.
        entry.job.state, entry.finished_unix_s = JobState.FINISHED, time.time()
        durable.job_finished(entry, "cancelled", error=True)
        other = _entry("k")
        durable.job_started(other)
        durable.tool_reported(other, "search")
        durable.drain()  # what the control plane does before closing its store
        store.flush()
        row = store.get_job("j")
        assert (row.state, row.finish_reason, row.generated_tokens) == ("finished", "cancelled", 3)
        assert store.get_transcript("j") == []
        assert store.get_job("k").meta["tool_category"] == "search"
    finally:
        store.close()
