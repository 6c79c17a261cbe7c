"""`WorkerService.Connect`: a worker registers, then reports; plans go back on the same stream.

The finish-reason rule. A real engine knows why a segment ended and says so in
`SegmentEnded.finish_reason`; that is used as is. The simulated backend generates exactly
`max_tokens` placeholder tokens and reports no reason (UNSPECIFIED); then the client's
RunSegment decides: a segment submitted with a `next_tool_category` hint ends with TOOL_CALL
(the job enters its API wait and the KV policy decides now, as in the simulator, which reads
the same fact from the trace), one without ends with LENGTH and finishes the job. So a client
replaying a trace sends the hint exactly on segments that call a tool. A model's STOP on a
segment sent with the hint is reported as STOP, but the job enters its API wait all the same
(a real model ends its tool calls and chat turns with EOS; the client ends the job).

Reports that do not fit (a job the worker does not hold, tokens out of order) are logged and
ignored: they come from races with cancellations and must not take the worker down. A memory
report that contradicts the worker's registration (more free blocks than it has, ...) or a
message that does not parse ends the stream with INVALID_ARGUMENT: the planner trusts those
numbers, so a worker sending them must not stay.

A worker told to stop (SIGTERM) sends Drain: it is answered with Shutdown(drain), the planner
places nothing more on it, and when it closes its side after its last segment it leaves as
"worker drained", not "worker lost" (`ControlPlane.worker_draining`).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from astraea import wire
from astraea.errors import InvalidRequest
from astraea.plan import JobState, KvAction
from astraea.telemetry import get_logger
from astraea.v1 import agent_pb2, common_pb2, worker_pb2, worker_pb2_grpc
from control_plane.core.scheduler import SchedulerError
from control_plane.service import validation
from control_plane.service.context import ControlPlane
from control_plane.service.registry import JobEntry, SegmentCall, WorkerEntry
from control_plane.service.reservations import Reservation, ViewCounters

log = get_logger("astraea.control_plane.workers")


_NOTHING = object()
_READER_DONE = object()  # queued on a worker's outbound queue when its reader ends


class _StreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerStreamServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Connect(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if first.WhichOneof("msg") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be register")
        try:
            info = wire.worker_info_from_proto(first.register)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        name = first.register.worker_name or context.peer()
        worker = self.cp.registry.add_worker(name, info)
        log.info("worker registered", worker_id=worker.worker_id, worker_name=name,
                 kv_blocks=info.kv_capacity_blocks, backend=info.backend,
                 needs_history=info.needs_history)
        yield worker_pb2.ControlMessage(
            registered=worker_pb2.Registered(
                worker_id=worker.worker_id,
                bundle_max_bytes=self.cp.config.max_receive_message_bytes))
        self.cp.mark_dirty()
        outbound = worker.outbound
        reader = asyncio.ensure_future(self._consume(it, worker, context.peer()))
        # The reader's end is queued behind the messages already queued, so the loop below
        # waits on the queue alone (no task and no wait() per message sent).
        reader.add_done_callback(lambda _: outbound.put_nowait(_READER_DONE))
        error: _StreamError | None = None
        closed_by_us = False
        held = _NOTHING  # a message taken from the queue but not sent yet
        try:
            while True:
                if held is not _NOTHING:
                    msg, held = held, _NOTHING
                else:
                    msg = await outbound.get()
                if msg is None:
                    closed_by_us = True
                    if worker.drop_reason is not None:  # dropped as silent: say why
                        error = _StreamError(grpc.StatusCode.UNAVAILABLE, worker.drop_reason)
                    break
                if msg is not _READER_DONE:
                    if msg.WhichOneof("msg") == "plan":
                        # Plans queued back to back go out as one message: the worker carries
                        # out the same actions in the same order, with one write, not several,
                        # as long as the message stays within what the worker receives.
                        size, limit = msg.ByteSize(), self.cp.config.worker_max_receive_bytes
                        while not outbound.empty():
                            nxt = outbound.get_nowait()
                            if (nxt is None or nxt is _READER_DONE
                                    or nxt.WhichOneof("msg") != "plan"
                                    or size + nxt.ByteSize() > limit):
                                held = nxt
                                break
                            size += nxt.ByteSize()
                            msg.plan.actions.extend(nxt.plan.actions)
                            msg.plan.seq = nxt.plan.seq  # applying it applies both
                    yield msg
                    continue
                exc = None if reader.cancelled() else reader.exception()
                if isinstance(exc, _StreamError):
                    error = exc
                elif isinstance(exc, InvalidRequest):  # a message that does not parse
                    error = _StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                elif exc is not None:
                    log.error("worker stream failed", worker_id=worker.worker_id,
                              error=repr(exc))
                    error = _StreamError(grpc.StatusCode.INTERNAL, f"control plane error: {exc}")
                break  # the worker closed its side (or broke the protocol)
        finally:
            reader.cancel()
            self.cp.worker_lost(worker.worker_id, expected=closed_by_us)
        if error is not None:
            await context.abort(error.code, error.message)

    async def _consume(self, it, worker: WorkerEntry, peer: str) -> None:
        async for msg in it:
            worker.last_seen = time.monotonic()
            if msg.WhichOneof("msg") != "bundle":
                self._report(msg, worker, peer)
            else:
                self.cp.stats.bundles += 1
                for inner in msg.bundle.messages:  # in order, as if sent one by one
                    if inner.WhichOneof("msg") == "bundle":
                        raise _StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"worker {worker.worker_id}: a bundle inside a bundle")
                    self._report(inner, worker, peer)
            self.cp.settled()

    def _report(self, msg: worker_pb2.WorkerMessage, worker: WorkerEntry, peer: str) -> None:
        kind = msg.WhichOneof("msg")
        self.cp.stats.events[kind] += 1
        if kind == "register":
            raise _StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"worker {worker.worker_id} is already registered on this "
                               "stream: register must be sent once")
        try:
            if kind == "memory":
                self._check_memory(worker, msg.memory, peer)
                worker.memory_reported(
                    wire.worker_view_from_proto(msg.memory, worker.worker_id),
                    msg.memory.applied_plan_seq)
                self.cp.mark_dirty()
            elif kind == "tokens":
                for jt in msg.tokens.jobs:
                    self._tokens(worker, jt)
            elif kind == "segment_ended":
                self._segment_ended(worker, msg.segment_ended)
            elif kind == "preempted":
                self._preempted(worker, msg.preempted)
            elif kind == "admit_refused":
                self._admit_refused(worker, msg.admit_refused)
            elif kind == "step_report":
                self.cp.observe_steps(msg.step_report.steps, worker.worker_id)
            elif kind == "drain":
                self.cp.worker_draining(worker.worker_id, msg.drain.reason)
            elif kind == "heartbeat":
                pass
            else:
                raise ValueError("WorkerMessage has no msg set")
        except (ValueError, SchedulerError) as e:
            # One bad report is dropped; the stream and the other jobs carry on.
            log.warning("bad worker report ignored", worker_id=worker.worker_id,
                        kind=kind, error=str(e))

    def _check_memory(self, worker: WorkerEntry, m: worker_pb2.MemoryReport, peer: str) -> None:
        try:
            validation.memory_report(m, worker.info)
        except InvalidRequest as e:
            log.warning("memory report contradicts the registration, dropping the worker",
                        worker_id=worker.worker_id, worker_name=worker.name, peer=peer,
                        error=str(e))
            raise _StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"worker {worker.worker_id} ({worker.name}): {e}") from None

    # --- reports --------------------------------------------------------------------------
    def _held(self, worker: WorkerEntry, job_id: str,
              what: str) -> tuple[JobEntry, SegmentCall] | None:
        """The job's entry and running segment if `worker` runs it; else log and None."""
        entry = self.cp.registry.jobs.get(job_id)
        job = entry.job if entry else None
        if (entry is None or entry.segment is None or job.state is not JobState.RUNNING
                or job.worker_id != worker.worker_id):
            # After a cancel or a worker-side race this is expected; otherwise a worker bug.
            expected = entry is not None and job.state is JobState.FINISHED
            (log.info if expected else log.warning)(
                "report for a job the worker does not run, ignored", worker_id=worker.worker_id,
                job_id=job_id, report=what, job_state=job.state.value if job else "unknown")
            return None
        return entry, entry.segment

    def _tokens(self, worker: WorkerEntry, jt: worker_pb2.JobTokens) -> None:
        held = self._held(worker, jt.job_id, "tokens")
        if held is None:
            return
        entry, seg = held
        ids = list(jt.token_ids)
        skip = seg.next_index - jt.first_index
        if skip < 0:
            log.warning("token gap from worker", job_id=jt.job_id, expected=seg.next_index,
                        got=jt.first_index)
            skip = 0
        ids = ids[skip:]  # tokens already streamed are never sent twice
        if not ids:
            return
        if seg.first_token_s is None:
            seg.first_token_s = self.cp.now()
        event = agent_pb2.RunSegmentEvent(tokens=agent_pb2.TokenEvent(
            first_index=seg.next_index, token_ids=ids, text=jt.text if skip == 0 else ""))
        seg.next_index += len(ids)
        entry.generated_total += len(ids)
        out = entry.output
        if out is None:  # the segment's first tokens: its output piece of the transcript
            out = entry.output = []
            entry.transcript.append(out)
        out.extend(ids)
        if self.cp.durable is not None:
            self.cp.durable.tokens(entry, seg, ids)
        self.cp.emit(seg, event)  # after the tokens' writes: durable before the client sees

    def _segment_ended(self, worker: WorkerEntry, m: worker_pb2.SegmentEnded) -> None:
        held = self._held(worker, m.job_id, "segment_ended")
        if held is None:
            return
        entry, seg = held
        if m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            reason = (common_pb2.FINISH_REASON_TOOL_CALL if seg.calls_tool
                      else common_pb2.FINISH_REASON_LENGTH)
        else:
            reason = m.finish_reason
        # A model's own stop on a segment sent with the hint still leaves the job open: a real
        # model ends a tool call (or a chat turn) with EOS, and the client, not the model,
        # says when the job is over (EndJob).
        calls_tool = reason == common_pb2.FINISH_REASON_TOOL_CALL or (
            reason == common_pb2.FINISH_REASON_STOP and seg.calls_tool)
        now = self.cp.now()
        job = entry.job
        job.preempting = False  # a Preempt that lost the race to the segment's end
        before = ViewCounters.of(worker.view)
        pause = self.cp.scheduler.segment_ended(m.job_id, now, m.generated_tokens,
                                                m.prefill_tokens, calls_tool,
                                                seg.tool_category, worker.view)
        seg.generated += m.generated_tokens
        if seg.generated != seg.next_index:
            log.warning("worker's token count differs from tokens streamed", job_id=m.job_id,
                        reported=seg.generated, streamed=seg.next_index)
        seg.done = True
        first = seg.first_token_s if seg.first_token_s is not None else now
        if self.cp.durable is not None:
            self.cp.durable.segment_ended(entry, seg, reason)
        self.cp.emit(seg, agent_pb2.RunSegmentEvent(done=agent_pb2.SegmentDone(
            finish_reason=reason, segment_index=seg.index,
            timings=common_pb2.Timings(
                queue_wait_s=job.waiting_s - seg.wait_before, ttft_s=first - seg.submitted_s,
                duration_s=now - seg.submitted_s, prefill_tokens=m.prefill_tokens,
                decode_tokens=seg.generated))))
        predicted = (self.cp.scheduler.estimator.api_duration_s(job) if pause is not None
                     else None)
        self.cp.tracing.segment_ended(job, seg.generated, first - seg.submitted_s,
                                      (seg.tool_category or "unknown") if pause else None,
                                      predicted)
        if pause is not None:
            # Sent as a plan: what it frees stays in the view until a report includes it.
            change = Reservation.since(before, worker.view)
            self.cp.send(worker.worker_id, [wire.plan_action_to_proto(pause)], change)
        else:
            self.cp.finish_job(entry, "segment ended without a tool call", cancel=False)
        self.cp.mark_dirty()

    def _preempted(self, worker: WorkerEntry, m: worker_pb2.Preempted) -> None:
        held = self._held(worker, m.job_id, "preempted")
        if held is None:
            return
        _, seg = held
        action = wire.kv_action_from_proto(m.action, "Preempted.action")
        self.cp.scheduler.segment_preempted(m.job_id, self.cp.now(), m.generated_tokens, action)
        seg.generated += m.generated_tokens
        self.cp.tracing.segment_preempted(m.job_id, m.generated_tokens, action.value)
        self.cp.mark_dirty()

    def _admit_refused(self, worker: WorkerEntry, m: worker_pb2.AdmitRefused) -> None:
        """The worker's engine refused the job's Admit and freed its KV. Retryable: queued
        again as a preemption with nothing generated, and the prompt is sent again if that
        Admit carried it. Not retryable (it can never run there): the job fails."""
        held = self._held(worker, m.job_id, "admit_refused")
        if held is None:
            return
        entry, seg = held
        reason = m.reason or "no reason given"
        self.cp.tracing.admit_refused(m.job_id, worker.worker_id, reason, m.retryable)
        if not m.retryable:
            log.warning("admit refused for good, failing the job", job_id=m.job_id,
                        worker_id=worker.worker_id, reason=reason)
            self.cp.finish_job(entry, f"worker {worker.worker_id} ({worker.name}) refused it: "
                               f"{reason}", cancel=True, error=True,
                               code=grpc.StatusCode.FAILED_PRECONDITION)
            return
        log.warning("admit refused, job queued again", job_id=m.job_id,
                    worker_id=worker.worker_id, reason=reason)
        self.cp.scheduler.segment_preempted(m.job_id, self.cp.now(), 0, KvAction.DISCARD)
        if seg.prompt_in_admit:
            # The worker did not take the prompt: the next Admit carries it (and adds it to
            # the transcript) again. Nothing was generated after it, so it is the last piece.
            seg.admitted = seg.prompt_in_admit = False
            if entry.output is None and entry.transcript:
                entry.transcript.pop()
        if entry.context_in_admit:
            # Whether the worker kept the history it was sent is unknown: send it again.
            entry.context_in_admit = False
            entry.history_worker = None
        self.cp.mark_dirty()
