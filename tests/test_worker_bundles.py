"""Bundled worker reports: several WorkerMessages in one gRPC message, handled as if sent one by
one. The control plane offers them in Registered (`bundle_max_bytes`, its receive limit); a
worker bundles what it has queued, within that size; a malformed bundle ends the stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_admit_refused_and_history import (
    FakeWorker,
    _collect,
    _segment,
    _until,
    control_plane,
)

from astraea.v1 import agent_pb2, common_pb2, worker_pb2
from worker.messages import bundled


def _tokens(first: int, ids: list[int]) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(tokens=worker_pb2.TokenBatch(jobs=[worker_pb2.JobTokens(
        job_id="j", first_index=first, token_ids=ids)]))


def test_the_control_plane_offers_bundles_up_to_its_receive_limit():
    async def main():
        async with control_plane() as (address, _stub, cp):
            w = FakeWorker(address, "w0")
            await w.call.write(worker_pb2.WorkerMessage(register=worker_pb2.Register(
                worker_name="w0", model="tiny", backend="fake", kv_capacity_blocks=100,
                block_size=16, max_num_seqs=8, max_num_batched_tokens=512)))
            first = await asyncio.wait_for(w.call.read(), 5)
            assert first.registered.bundle_max_bytes == cp.config.max_receive_message_bytes > 0
            await w.close()
    asyncio.run(main())


def test_a_bundle_is_handled_in_order_as_its_messages_one_by_one():
    """Tokens, then the segment's end, in one message: the client gets every token once, in
    order, then done; a bundle whose order is wrong (end before tokens) would lose them."""
    async def main():
        async with control_plane() as (address, stub, cp):
            w = await FakeWorker(address, "w0").register()
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="j"))
            call = _segment(stub, "hello", max_tokens=5)
            await w.expect("admit")
            await w.send(bundle=worker_pb2.Bundle(messages=[
                _tokens(0, [11, 12]), _tokens(2, [13, 14, 15]),
                worker_pb2.WorkerMessage(segment_ended=worker_pb2.SegmentEnded(
                    job_id="j", generated_tokens=5, prefill_tokens=2,
                    finish_reason=common_pb2.FINISH_REASON_LENGTH)),
                worker_pb2.WorkerMessage(memory=worker_pb2.MemoryReport(
                    total_blocks=1000, free_blocks=990, block_size=16, max_seqs=8))]))
            tokens, done = await asyncio.wait_for(_collect(call), 5)
            assert tokens == [11, 12, 13, 14, 15]
            assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
            await _until(lambda: cp.stats.bundles == 1)
            assert cp.stats.events["tokens"] == 2 and cp.stats.events["segment_ended"] == 1
            assert cp.stats.events["memory"] == 1
            await w.close()
    asyncio.run(main())


@pytest.mark.parametrize("inner", [
    worker_pb2.WorkerMessage(bundle=worker_pb2.Bundle()),
    worker_pb2.WorkerMessage(register=worker_pb2.Register(worker_name="again")),
], ids=["bundle-in-bundle", "register-in-bundle"])
def test_a_bundle_that_breaks_the_protocol_ends_the_stream_with_invalid_argument(inner):
    async def main():
        async with control_plane() as (address, _stub, cp):
            w = await FakeWorker(address, "w0").register()
            await w.send(bundle=worker_pb2.Bundle(messages=[inner]))
            code = await asyncio.wait_for(w.call.code(), 5)
            details = await w.call.details()
            await _until(lambda: not cp.registry.workers)
            await w.close()
            return code, details
    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bundle inside a bundle" in details or "register must be sent once" in details


def test_the_worker_bundles_runs_within_the_size_limit_and_keeps_the_order():
    msgs = [_tokens(1 + i, [1 + i] * 100) for i in range(10)]  # all of one size
    one = msgs[0].ByteSize()
    assert bundled(msgs[:1], 10_000) == msgs[:1]  # one message goes as it is
    out = bundled(msgs, 3 * (one + 8))
    assert [m.WhichOneof("msg") for m in out] == ["bundle"] * 3 + ["tokens"]
    assert all(m.ByteSize() <= 3 * (one + 8) for m in out)
    flat = [x for m in out for x in (m.bundle.messages if m.HasField("bundle") else [m])]
    assert flat == msgs
    # A message larger than the limit alone still goes (alone): the stream refuses it as
    # it would have refused it unbundled.
    assert bundled(msgs[:3], one // 2) == msgs[:3]
