"""Refused admissions and job history, over real gRPC on loopback with hand-written workers.

A worker whose engine refuses an Admit says so (`AdmitRefused`): the control plane sends the
prompt again with the next Admit, or fails the job when the refusal cannot be retried. A job
whose history its worker no longer holds (the worker was lost, or the job moved) is admitted
with that history (`Admit.context`) when its worker registered `needs_history` (a real
engine); one that did not (the simulated engine) recomputes from counts.
The worker side: the worker process frees a refused job's KV and reports the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from astraea import wire
from astraea.plan import Admit, KvAction, Pause
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.backend import BackendError, TokensGenerated
from worker.messages import AdmitRefused, to_messages
from worker.process import WorkerProcess
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"
WAIT_S = 5.0


class FakeWorker:
    """A worker stream written by hand: registers (keeping histories if `needs_history`, as
    a real engine does), records every plan action it is sent, and sends whatever reports the
    test tells it to."""

    def __init__(self, address: str, name: str, needs_history: bool = True,
                 backend: str = "fake") -> None:
        self.name, self.needs_history, self.backend = name, needs_history, backend
        self.channel = grpc.aio.insecure_channel(address)
        self.call = worker_pb2_grpc.WorkerServiceStub(self.channel).Connect()
        self.actions: asyncio.Queue[worker_pb2.PlanAction] = asyncio.Queue()
        self.seen: list[worker_pb2.PlanAction] = []
        self.worker_id = -1
        self._reader: asyncio.Task | None = None

    async def register(self) -> FakeWorker:
        await self.call.write(worker_pb2.WorkerMessage(register=worker_pb2.Register(
            worker_name=self.name, model="tiny", backend=self.backend,
            needs_history=self.needs_history, kv_capacity_blocks=1000, block_size=16,
            max_num_seqs=8, max_num_batched_tokens=512)))
        first = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert first.WhichOneof("msg") == "registered"
        self.worker_id = first.registered.worker_id
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.WhichOneof("msg") == "plan":
                    for pa in msg.plan.actions:
                        self.seen.append(pa)
                        self.actions.put_nowait(pa)

    async def expect(self, kind: str, job_id: str = "j"):
        """The next action of `kind` for `job_id` (others are skipped, but kept in `seen`)."""
        while True:
            pa = await asyncio.wait_for(self.actions.get(), WAIT_S)
            if pa.WhichOneof("action") == kind and getattr(pa, kind).job_id == job_id:
                return getattr(pa, kind)

    def kinds(self, job_id: str = "j") -> list[str]:
        return [pa.WhichOneof("action") for pa in self.seen
                if getattr(pa, pa.WhichOneof("action")).job_id == job_id]

    async def send(self, **msg) -> None:
        await self.call.write(worker_pb2.WorkerMessage(**msg))

    async def tokens(self, first_index: int, ids: list[int], job_id: str = "j") -> None:
        await self.send(tokens=worker_pb2.TokenBatch(jobs=[worker_pb2.JobTokens(
            job_id=job_id, first_index=first_index, token_ids=ids)]))

    async def ended(self, generated: int, reason=common_pb2.FINISH_REASON_TOOL_CALL,
                    job_id: str = "j") -> None:
        await self.send(segment_ended=worker_pb2.SegmentEnded(
            job_id=job_id, generated_tokens=generated, prefill_tokens=1, finish_reason=reason))

    async def refuse(self, reason: str, retryable: bool, job_id: str = "j") -> None:
        await self.send(admit_refused=worker_pb2.AdmitRefused(
            job_id=job_id, reason=reason, retryable=retryable))

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.channel.close()


@contextlib.asynccontextmanager
async def control_plane():
    server = await serve("127.0.0.1:0", "astraea", PROFILE,
                         ServiceConfig(time_scale=1.0, worker_timeout_s=0))
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield address, agent_pb2_grpc.AgentServiceStub(channel), server.control_plane
    finally:
        await channel.close()
        await server.stop(grace=0.5)


async def _until(predicate) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def _segment(stub, prompt: str | list[int], max_tokens: int, tool: str = ""):
    req = agent_pb2.RunSegmentRequest(
        job_id="j", sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        next_tool_category=tool)
    if isinstance(prompt, str):
        req.prompt_text = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return stub.RunSegment(req)


async def _collect(call) -> tuple[list[int], agent_pb2.SegmentDone]:
    """The segment's tokens (checking each arrives once, in order) and its done event."""
    tokens, done = [], None
    async for ev in call:
        assert done is None, "event after done"
        if ev.WhichOneof("event") == "tokens":
            assert ev.tokens.first_index == len(tokens), "a token sent twice or skipped"
            tokens.extend(ev.tokens.token_ids)
        else:
            done = ev.done
    return tokens, done


def _context(admit: worker_pb2.Admit) -> list[str | list[int]]:
    return [p.text if p.WhichOneof("piece") == "text" else list(p.token_ids.ids)
            for p in admit.context]


async def _tool_call(stub) -> None:
    for phase in (agent_pb2.TOOL_CALL_PHASE_START, agent_pb2.TOOL_CALL_PHASE_END):
        await stub.ReportToolCall(agent_pb2.ReportToolCallRequest(
            job_id="j", phase=phase, category="search"))


# --- refused admissions -----------------------------------------------------------------


def test_a_retryable_refusal_of_the_first_admit_sends_the_prompt_again():
    async def main():
        async with control_plane() as (address, stub, cp):
            w = await FakeWorker(address, "a").register()
            try:
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
                seg = asyncio.create_task(_collect(_segment(stub, "what is 2+2?", 3)))
                first = await w.expect("admit")
                assert first.prompt_text == "what is 2+2?"
                await w.refuse("no free KV blocks", retryable=True)
                # Queued again, and the next Admit carries the prompt the engine did not take
                # (with no history: the only prompt is the one sent as the prompt).
                again = await w.expect("admit")
                assert again.prompt_text == "what is 2+2?"
                assert again.max_tokens == 3 and not again.context
                await w.tokens(0, [11, 12, 13])
                await w.ended(3, common_pb2.FINISH_REASON_STOP)
                tokens, done = await asyncio.wait_for(seg, WAIT_S)
                assert tokens == [11, 12, 13]
                assert done.finish_reason == common_pb2.FINISH_REASON_STOP
                assert "abort" not in w.kinds()[:2]  # the refusal itself aborts nothing
            finally:
                await w.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_retryable_refusal_of_a_later_admit_does_not_send_the_prompt_again():
    """The prompt was delivered by an earlier, accepted Admit: the worker holds it."""
    async def main():
        async with control_plane() as (address, stub, cp):
            w = await FakeWorker(address, "a").register()
            try:
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
                seg = asyncio.create_task(_collect(_segment(stub, [1, 2, 3], 4)))
                assert list((await w.expect("admit")).prompt_token_ids.ids) == [1, 2, 3]
                await w.tokens(0, [21])
                await w.send(preempted=worker_pb2.Preempted(
                    job_id="j", generated_tokens=1, action=common_pb2.KV_ACTION_DISCARD))
                second = await w.expect("admit")
                assert second.WhichOneof("prompt") is None and second.max_tokens == 3
                await w.refuse("no free KV blocks", retryable=True)
                third = await w.expect("admit")
                assert third.WhichOneof("prompt") is None and third.max_tokens == 3
                assert not third.context  # the same worker: it kept the history
                await w.tokens(1, [22, 23, 24])
                await w.ended(3, common_pb2.FINISH_REASON_STOP)
                tokens, _ = await asyncio.wait_for(seg, WAIT_S)
                assert tokens == [21, 22, 23, 24]
            finally:
                await w.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_refusal_that_cannot_be_retried_fails_the_job_with_the_workers_reason():
    async def main():
        async with control_plane() as (address, stub, cp):
            w = await FakeWorker(address, "a").register()
            try:
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
                call = _segment(stub, "a very long prompt", 3)
                seg = asyncio.create_task(_collect(call))
                await w.expect("admit")
                reason = "context 5000 + max_tokens 3 exceeds the model's window (4096)"
                await w.refuse(reason, retryable=False)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(seg, WAIT_S)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert reason in err.value.details()
                abort = await w.expect("abort")  # the worker frees whatever it kept
                assert abort.job_id == "j"
                status = await stub.GetJob(agent_pb2.GetJobRequest(job_id="j"))
                assert status.state == common_pb2.JOB_STATE_FINISHED
                assert "j" not in cp.scheduler.jobs
                assert w.kinds().count("admit") == 1  # not queued again
            finally:
                await w.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# --- history for a worker that does not hold it -----------------------------------------


def test_a_job_rehomed_after_its_worker_is_lost_carries_its_history():
    async def main():
        async with control_plane() as (address, stub, cp):
            a = await FakeWorker(address, "a").register()
            b = None
            try:
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
                seg = asyncio.create_task(_collect(_segment(stub, "find the weather", 3,
                                                            tool="search")))
                first = await a.expect("admit")
                assert first.prompt_text == "find the weather" and not first.context
                await a.tokens(0, [5, 6])
                await a.tokens(1, [6, 7])  # a resent token: dropped, not streamed twice
                await a.ended(3)
                tokens, done = await asyncio.wait_for(seg, WAIT_S)
                assert tokens == [5, 6, 7]
                assert done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALL
                await a.expect("pause")
                await _tool_call(stub)
                await a.close()  # worker A is lost with all it held
                await _until(lambda: a.worker_id not in cp.registry.workers)
                b = await FakeWorker(address, "b").register()
                seg = asyncio.create_task(_collect(_segment(stub, [40, 41], 2)))
                admit = await b.expect("admit")
                # The history it must recompute, and the new prompt on its own.
                assert _context(admit) == ["find the weather", [5, 6, 7]]
                assert list(admit.prompt_token_ids.ids) == [40, 41]
                assert admit.max_tokens == 2
                # Refused: the next Admit carries the same history and prompt again, once each.
                await b.refuse("no free KV blocks", retryable=True)
                again = await b.expect("admit")
                assert _context(again) == ["find the weather", [5, 6, 7]]
                assert list(again.prompt_token_ids.ids) == [40, 41]
                await b.tokens(0, [8, 9])
                await b.ended(2, common_pb2.FINISH_REASON_STOP)
                tokens, _ = await asyncio.wait_for(seg, WAIT_S)
                assert tokens == [8, 9]
            finally:
                await a.close()
                if b is not None:
                    await b.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_segment_cut_by_a_lost_worker_resumes_elsewhere_with_its_partial_output():
    async def main():
        async with control_plane() as (address, stub, cp):
            a = await FakeWorker(address, "a").register()
            b = None
            try:
                await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
                seg = asyncio.create_task(_collect(_segment(stub, "count to five", 5)))
                await a.expect("admit")
                await a.tokens(0, [1, 2])
                await _until(lambda: cp.registry.jobs["j"].segment.next_index == 2)
                await a.close()
                await _until(lambda: a.worker_id not in cp.registry.workers)
                b = await FakeWorker(address, "b").register()
                admit = await b.expect("admit")
                # The prompt was delivered (to A) already: it is history now, with the two
                # tokens streamed; B generates the rest of the budget.
                assert admit.WhichOneof("prompt") is None
                assert _context(admit) == ["count to five", [1, 2]]
                assert admit.max_tokens == 3
                await b.tokens(2, [3, 4, 5])
                await b.ended(3, common_pb2.FINISH_REASON_STOP)
                tokens, _ = await asyncio.wait_for(seg, WAIT_S)
                assert tokens == [1, 2, 3, 4, 5]
            finally:
                await a.close()
                if b is not None:
                    await b.close()

    asyncio.run(asyncio.wait_for(main(), 30))


async def _move_after_preemption(needs_history: bool, backend: str = "fake"):
    """Job runs on A, is preempted with its KV discarded, and A reports itself full: the job
    is admitted on B while A stays connected. Returns (B's Admit, A's actions for the job)."""
    async with control_plane() as (address, stub, cp):
        a = await FakeWorker(address, "a", needs_history, backend).register()
        b = await FakeWorker(address, "b", needs_history, backend).register()
        try:
            await stub.StartJob(agent_pb2.StartJobRequest(job_id="j", category="test"))
            seg = asyncio.create_task(_collect(_segment(stub, [7, 7, 7], 4)))
            first = await a.expect("admit")  # the first registered wins the tie
            await a.tokens(0, [1])
            full = wire.worker_view_to_proto(cp.registry.workers[a.worker_id].view)
            full.free_blocks, full.running_seqs = 0, full.max_seqs
            full.applied_plan_seq = cp.registry.workers[a.worker_id].plan_seq
            await a.send(memory=full)
            await a.send(preempted=worker_pb2.Preempted(
                job_id="j", generated_tokens=1, action=common_pb2.KV_ACTION_DISCARD))
            admit = await b.expect("admit")
            await b.tokens(1, [2, 3, 4])
            await b.ended(3, common_pb2.FINISH_REASON_STOP)
            tokens, _ = await asyncio.wait_for(seg, WAIT_S)
            assert tokens == [1, 2, 3, 4]
            assert list(first.prompt_token_ids.ids) == [7, 7, 7]
            await asyncio.sleep(0.1)  # anything sent to A with B's Admit has landed
            return admit, a.kinds()
        finally:
            await a.close()
            await b.close()


def test_a_job_moved_to_another_real_worker_carries_its_history_and_frees_the_old_copy():
    async def main():
        admit, on_a = await _move_after_preemption(needs_history=True)
        assert admit.WhichOneof("prompt") is None
        assert _context(admit) == [[7, 7, 7], [1]]
        assert on_a == ["admit", "abort"]  # A still held the history: it frees it

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_job_moved_between_simulated_workers_gets_no_history():
    async def main():
        admit, on_a = await _move_after_preemption(needs_history=False)
        assert admit.WhichOneof("prompt") is None and admit.max_tokens == 3
        assert not admit.context  # the simulated engine recomputes from counts
        assert on_a == ["admit"]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_history_follows_the_declared_capability_not_the_backend_name():
    async def main():
        admit, on_a = await _move_after_preemption(needs_history=True, backend="sim")
        assert _context(admit) == [[7, 7, 7], [1]]
        assert on_a == ["admit", "abort"]
        admit, on_a = await _move_after_preemption(needs_history=False, backend="vllm")
        assert not admit.context and on_a == ["admit"]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_simulated_backend_declares_it_needs_no_history(simple_profile):
    # It recomputes a job's context from token counts; the vLLM backend declares True.
    assert SimulatedBackend(simple_profile).describe().needs_history is False


# --- the worker side --------------------------------------------------------------------


def test_the_worker_frees_a_refused_jobs_kv_and_reports_the_refusal(simple_profile):
    """The engine refuses an Admit (no room): the worker releases the job's KV (here a
    preserved segment's) and reports AdmitRefused after the job's tokens, not a preemption."""
    async def main():
        backend = SimulatedBackend(simple_profile, time_scale=0.001, kv_blocks=20)
        await backend.start()
        wp = WorkerProcess(backend, "w")
        wp.worker_id = 0
        events = backend.events().__aiter__()
        try:
            def admit(new: int, context: int) -> worker_pb2.PlanAction:
                pa = wire.plan_action_to_proto(Admit("j", 0, new, context))
                pa.admit.max_tokens = 2
                return pa

            await wp._apply(admit(100, 0))
            while True:
                ev = await asyncio.wait_for(events.__anext__(), WAIT_S)
                if type(ev).__name__ == "SegmentEnded":
                    break
            await wp._apply(wire.plan_action_to_proto(Pause("j", 0, KvAction.PRESERVE)))
            assert backend.view().free_blocks < 20  # the preserved segment holds KV
            await wp._apply(admit(400, 102))  # 25 more blocks: no room
            assert backend.view().free_blocks == 20
            refused = wp._out.get_nowait()
            assert refused == AdmitRefused("j", refused.reason, True)
            assert "needs" in refused.reason
            assert wp._out.empty()
            msgs = to_messages([TokensGenerated("j", (1, 2), 0), refused], 0)
            assert [m.WhichOneof("msg") for m in msgs] == ["tokens", "admit_refused"]
            assert msgs[1].admit_refused.retryable and msgs[1].admit_refused.job_id == "j"
        finally:
            await backend.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_refusal_that_cannot_be_retried_is_reported_so():
    class Refusing:
        def __init__(self) -> None:
            self.released: list[str] = []

        async def apply(self, action, segment=None):
            raise BackendError("prompt longer than the model's window", retryable=False)

        async def release(self, job_id):
            self.released.append(job_id)

    async def main():
        backend = Refusing()
        wp = WorkerProcess(backend, "w")
        wp.worker_id = 0
        await wp._apply(wire.plan_action_to_proto(Admit("j", 0, 10, 0)))
        assert backend.released == ["j"]
        assert wp._out.get_nowait() == AdmitRefused(
            "j", "prompt longer than the model's window", False)
        # Other refused actions are only logged: no report, nothing released.
        await wp._apply(wire.plan_action_to_proto(Pause("j", 0, KvAction.DISCARD)))
        assert wp._out.empty() and backend.released == ["j"]

    asyncio.run(asyncio.wait_for(main(), 30))
