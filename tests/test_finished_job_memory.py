"""A finished job's KV counts as free in its worker's view as soon as the control plane sends
the Abort that frees it, not only once the worker reports it applied: the simulator's engine
frees a job's blocks when it ends, and until that report every plan of the live control plane
saw the blocks held (and took memory back from jobs in tool waits for room already there).
Over real gRPC with a hand-written worker, so the test decides what each report says."""

from __future__ import annotations

import asyncio

from test_admit_refused_and_history import WAIT_S, FakeWorker, _until, control_plane

from astraea.v1 import agent_pb2, common_pb2, worker_pb2

TOTAL, BLOCK = 1000, 16


def _memory(free: int, applied: int) -> dict:
    return {"memory": worker_pb2.MemoryReport(
        total_blocks=TOTAL, free_blocks=free, block_size=BLOCK, host_free_blocks=0,
        running_seqs=0, max_seqs=8, applied_plan_seq=applied)}


def test_a_finished_jobs_blocks_are_free_in_the_view_before_the_worker_reports_them():
    async def body():
        async with control_plane() as (address, stub, cp):
            w = await FakeWorker(address, "w").register()
            seqs: list[int] = []
            real_read = w.call.read

            async def read():  # remember each plan's sequence number
                msg = await real_read()
                if isinstance(msg, worker_pb2.ControlMessage) and msg.WhichOneof("msg") == "plan":
                    seqs.append(msg.plan.seq)
                return msg
            w.call.read = read
            try:
                await w.send(**_memory(TOTAL, 0))
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="qa"))
                call = stub.RunSegment(agent_pb2.RunSegmentRequest(
                    job_id="j", prompt_token_ids=common_pb2.TokenIds(ids=[1] * 160),
                    sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)))
                admit = await w.expect("admit")
                assert admit.new_tokens == 160
                admitted = seqs[-1]
                held = TOTAL - 11  # 160 prompt tokens and the 3 decoded with KV: 11 blocks
                await w.send(**_memory(held, admitted))
                await w.tokens(0, [5, 6, 7, 8])
                await w.ended(4, reason=common_pb2.FINISH_REASON_LENGTH)
                await w.expect("abort")
                aborted = seqs[-1]
                assert aborted > admitted
                view = cp.registry.workers[w.worker_id].view
                # A report taken before the worker applied the Abort still shows the blocks
                # held; the view counts them free already.
                await w.send(**_memory(held, admitted))
                await _until(lambda: view.free_blocks == TOTAL)
                assert cp.registry.workers[w.worker_id].view.free_blocks == TOTAL
                # Once a report covers the Abort, the view is the report (not freed twice).
                await w.send(**_memory(TOTAL, aborted))
                await asyncio.sleep(0.1)
                assert cp.registry.workers[w.worker_id].view.free_blocks == TOTAL
                done = [ev async for ev in call if ev.HasField("done")]
                assert len(done) == 1
            finally:
                await w.close()
    asyncio.run(asyncio.wait_for(body(), 4 * WAIT_S))
