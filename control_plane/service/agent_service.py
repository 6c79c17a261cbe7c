"""`AgentService`: the client-facing API on the shared `Scheduler`.

Errors are gRPC statuses with a message naming the job and the problem: NOT_FOUND for an
unknown job, ALREADY_EXISTS for a duplicate id, FAILED_PRECONDITION for a call the job's state
does not allow (a segment on a finished job, or while one runs), INVALID_ARGUMENT for bad
input (every string and list is bounded: limits.py). A bad call changes nothing. A client that
goes away mid-segment cancels its job, which frees its worker's memory (an Abort).

Overload is an answer: beyond `max_unfinished_jobs` (or `max_jobs_per_client` from one client
host) StartJob fails with RESOURCE_EXHAUSTED and trailing metadata `retry-after-ms`. A finished
job is answered by GetJob (state FINISHED, kv_state KV_STATE_NONE: its KV is freed) for
`finished_retention_s`, then forgotten: NOT_FOUND, and its id may be used again. A job left in
its API wait with no call from its client for `api_wait_timeout_s` is ended (its KV freed).

With keys (the server's --api-key-file), a job belongs to the key that started it: calls
about it with another key are answered NOT_FOUND, exactly as for a job that does not exist.
"""

from __future__ import annotations

import time
import uuid
from typing import NoReturn

import grpc
from opentelemetry import trace

from astraea.auth import caller
from astraea.errors import InvalidRequest
from astraea.plan import JobState
from astraea.store import StoreError
from astraea.telemetry import extract_context, get_logger
from astraea.v1 import agent_pb2, agent_pb2_grpc
from control_plane.service import validation
from control_plane.service.context import ControlPlane
from control_plane.service.limits import RETRY_AFTER_KEY
from control_plane.service.registry import JobEntry, SegmentCall, SegmentClosed

log = get_logger("astraea.control_plane.agents")


def client_host(context) -> str:
    """The peer's address without its port ("ipv4:10.0.0.7"): one client host, whatever
    connection it uses."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def owned_by_caller(entry: JobEntry) -> bool:
    """Whether the current call's key (its owner id, set by the auth interceptor) started the
    job. Without keys every caller and every job has the owner "": one owner for all."""
    return entry.owner == caller()


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def _entry(self, job_id: str, context) -> JobEntry:
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        try:
            validation.check_id(job_id, "job_id", self.cp.config)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        entry = self.cp.registry.jobs.get(job_id)
        if entry is None and self.cp.durable is not None:  # finished before a restart?
            entry = self.cp.durable.finished_entry(self.cp, job_id)
        if entry is None or not owned_by_caller(entry):  # another key's job: as if missing
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown job id {job_id!r}: never started here, or finished more than "
                f"{self.cp.config.finished_retention_s:g} s ago and forgotten")
        entry.last_call_s = time.monotonic()
        return entry

    async def _refuse_admission(self, context, message: str) -> NoReturn:
        self.cp.stats.events["start_job_refused"] += 1
        retry = self.cp.config.retry_after_ms
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{message}: retry in {retry} ms or later",
                            trailing_metadata=((RETRY_AFTER_KEY, str(retry)),))

    # --- StartJob ---------------------------------------------------------------------------
    async def StartJob(self, request, context):
        self.cp.stats.events["start_job"] += 1
        cfg = self.cp.config
        try:
            validation.check_id(request.job_id, "job_id", cfg)
            validation.check_id(request.category, "category", cfg)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        job_id = request.job_id or uuid.uuid4().hex
        registry = self.cp.registry
        if job_id in registry.jobs:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"job id {job_id!r} already exists")
        if registry.unfinished >= cfg.max_unfinished_jobs:
            await self._refuse_admission(
                context, f"the control plane holds {registry.unfinished} unfinished jobs, its "
                f"limit (max_unfinished_jobs {cfg.max_unfinished_jobs})")
        client = client_host(context)
        if cfg.max_jobs_per_client and \
                registry.unfinished_by_client[client] >= cfg.max_jobs_per_client:
            await self._refuse_admission(
                context, f"client {client} has {registry.unfinished_by_client[client]} "
                f"unfinished jobs, its limit (max_jobs_per_client {cfg.max_jobs_per_client})")
        job = self.cp.scheduler.job_arrived(job_id, self.cp.now(), request.category or "unknown")
        registry.jobs[job_id] = JobEntry(job=job, arrival_unix_s=time.time(), client=client,
                                        owner=caller())
        registry.unfinished_by_client[client] += 1
        # The job's trace continues the caller's, when it sent one.
        self.cp.tracing.job_started(job, extract_context(context))
        log.info("job started", job_id=job_id, category=job.category,
                 trace_id=self.cp.tracing.trace_id(job_id))
        await self._durable_start(registry.jobs[job_id], context)
        return agent_pb2.StartJobResponse(job_id=job_id)

    async def _durable_start(self, entry: JobEntry, context) -> None:
        """An accepted job is durable before StartJob answers; if the store fails, the job
        is dropped and the call fails UNAVAILABLE."""
        durable = self.cp.durable
        if durable is None:
            return
        try:
            durable.job_started(entry)
            await durable.flush()
        except StoreError as e:
            self.cp.finish_job(entry, "its durable state could not be written", cancel=True,
                               error=True)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"job {entry.job.job_id!r} could not be made durable: {e}")

    async def _durable_flush(self, context) -> None:
        """What was written so far is durable (EndJob, CancelJob answer after it)."""
        if self.cp.durable is None:
            return
        try:
            await self.cp.durable.flush()
        except StoreError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"durable state failed: {e}")

    # --- RunSegment -------------------------------------------------------------------------
    async def RunSegment(self, request, context):
        self.cp.stats.events["run_segment"] += 1
        entry = await self._entry(request.job_id, context)
        replay = await self._replay_ended(entry, request, context)
        if replay is not None:  # a resume of a segment that ended: its done was lost
            for event in replay:
                yield event
            return
        seg = await self._submit(entry, request, context)
        try:
            while True:
                event = await seg.events.get()
                if isinstance(event, SegmentClosed):
                    await context.abort(event.code, event.message)
                yield event
                if event.WhichOneof("event") == "done":
                    return
        finally:
            entry.last_call_s = time.monotonic()  # its API wait's timeout counts from here
            if not seg.done:  # the client went away (or the call was cancelled) mid-segment
                self.cp.finish_job(entry, "client disconnected mid-segment", cancel=True,
                                   error=True)

    async def _submit(self, entry: JobEntry, request, context) -> SegmentCall:
        job, cfg = entry.job, self.cp.config
        if job.state is JobState.FINISHED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r} is finished: no more segments")
        if job.state in (JobState.READY, JobState.RUNNING):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r} is already running segment "
                                f"{job.segment_index}: wait for its done event")
        try:
            validation.check_id(request.next_tool_category, "next_tool_category", cfg)
            new_tokens = validation.prompt_tokens(request, cfg)
            sampling = validation.sampling(request.sampling, cfg,
                                           self.cp.scheduler.profile.context_window,
                                           job.context_tokens, new_tokens)
            expected_tokens, expected_tool_s = validation.hints(
                request, cfg, self.cp.scheduler.profile.context_window)
            stored = self._resume_point(entry, request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"job {job.job_id!r}: {e}")
        new_tokens += stored  # a resumed segment's stored output is recomputed as input
        hint = request.next_tool_category or None
        now = self.cp.now()
        wait_before = job.waiting_s
        observed_api = now - job.api_start_s if job.state is JobState.API_WAIT else None
        api_span = self.cp.tracing.api_wait_span(job.job_id)
        if api_span is not None:
            # Current while the core learns the API duration: the predictor link ties the
            # observation it forwards to this span.
            with trace.use_span(api_span, end_on_exit=False):
                self.cp.scheduler.segment_submitted(job.job_id, now, new_tokens, hint,
                                                    expected_tokens, expected_tool_s)
        else:
            self.cp.scheduler.segment_submitted(job.job_id, now, new_tokens, hint,
                                                expected_tokens, expected_tool_s)
        self.cp.tracing.segment_submitted(job, job.segment_index, observed_api)
        entry.tool_started_s = None
        seg = SegmentCall(index=job.segment_index, new_tokens=new_tokens,
                          max_tokens=sampling.max_tokens, sampling=sampling, request=request,
                          calls_tool=hint is not None, tool_category=hint, submitted_s=now,
                          wait_before=wait_before)
        entry.segment = seg
        if self.cp.durable is not None:
            self.cp.durable.resumed(entry, seg, request)
            self.cp.durable.segment_accepted(entry, seg)
        self.cp.mark_dirty()
        self.cp.settled()
        return seg

    async def _replay_ended(self, entry: JobEntry, request, context):
        if self.cp.durable is None:
            return None
        try:
            return self.cp.durable.replay_ended(entry, request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job {entry.job.job_id!r}: {e}")

    def _resume_point(self, entry: JobEntry, request) -> int:
        if self.cp.durable is not None:
            return self.cp.durable.resume_point(entry, request)
        if request.resume_from_index:  # 0 is a plain (re)send: nothing to resume
            raise InvalidRequest("resume_from_index is set but this control plane keeps no "
                                 "durable state: there is nothing to resume")
        return 0

    # --- tool calls, end, cancel, status --------------------------------------------------
    async def ReportToolCall(self, request, context):
        self.cp.stats.events["tool_call"] += 1
        entry = await self._entry(request.job_id, context)
        job = entry.job
        try:
            validation.check_id(request.category, "category", self.cp.config)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.phase == agent_pb2.TOOL_CALL_PHASE_UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "phase is TOOL_CALL_PHASE_UNSPECIFIED: send START or END")
        if request.phase not in (agent_pb2.TOOL_CALL_PHASE_START, agent_pb2.TOOL_CALL_PHASE_END):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown tool call phase {request.phase}")
        if job.state is not JobState.API_WAIT:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r} is {job.state.value}: a tool call follows "
                                "a segment that ended with TOOL_CALL")
        if request.phase == agent_pb2.TOOL_CALL_PHASE_START and entry.tool_started_s is not None:
            # One tool call at a time per job: a second START would silently lose the first's
            # start time (and its duration, which the predictor learns from).
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r}: a tool call is already open (START sent, "
                                "END not yet): send its END first")
        now = self.cp.now()
        self.cp.tracing.tool_reported(
            job.job_id, "start" if request.phase == agent_pb2.TOOL_CALL_PHASE_START else "end",
            request.category)
        if request.phase == agent_pb2.TOOL_CALL_PHASE_START:
            entry.tool_started_s = now
            if request.category:
                # The API wait is learned under the tool actually called (observed at resume).
                job.next_tool_category = request.category
            if self.cp.durable is not None:
                self.cp.durable.tool_reported(entry, request.category)
            return agent_pb2.ReportToolCallResponse()
        if entry.tool_started_s is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r}: tool call END without START")
        observed = now - entry.tool_started_s
        entry.tool_started_s = None
        if self.cp.durable is not None:
            self.cp.durable.tool_reported(entry, request.category)
        return agent_pb2.ReportToolCallResponse(observed_duration_s=observed)

    async def EndJob(self, request, context):
        self.cp.stats.events["end_job"] += 1
        entry = await self._entry(request.job_id, context)
        job = entry.job
        if job.state in (JobState.READY, JobState.RUNNING):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.job_id!r} is running a segment: wait for it or "
                                "CancelJob")
        if entry.finished_unix_s is None:
            self.cp.finish_job(entry, "EndJob", cancel=True)
        await self._durable_flush(context)
        return agent_pb2.EndJobResponse(status=self.cp.job_status(entry))

    async def CancelJob(self, request, context):
        limit = self.cp.config.max_reason_chars
        if len(request.reason) > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"reason has {len(request.reason)} characters: at most {limit}")
        entry = await self._entry(request.job_id, context)
        if entry.finished_unix_s is None:
            self.cp.finish_job(entry, f"cancelled: {request.reason or 'no reason given'}",
                               cancel=True)
        await self._durable_flush(context)
        return agent_pb2.CancelJobResponse()

    async def GetJob(self, request, context):
        entry = await self._entry(request.job_id, context)
        return self.cp.job_status(entry)


