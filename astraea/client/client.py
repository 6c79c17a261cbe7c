"""`AgentClient` (blocking, `grpc`) and `AsyncAgentClient` (`grpc.aio`): see the package doc."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from astraea.auth import ClientCredentials
from astraea.client.retry import Backoff, RetryPolicy, resume_request, took_effect
from astraea.telemetry.propagation import inject_metadata
from astraea.v1 import agent_pb2, agent_pb2_grpc, common_pb2


class AstraeaError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")


class StreamOrderError(AstraeaError):
    """The RunSegment stream broke its contract (a gap or overlap in token indices, an event
    after `done`, or no `done` at all). Reported with code DATA_LOSS."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, message, "RunSegment")


def _wrap(e: grpc.RpcError, method: str) -> AstraeaError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return AstraeaError(code or grpc.StatusCode.UNKNOWN, details or "", method)


class FinishReason(enum.Enum):
    TOOL_CALL = common_pb2.FINISH_REASON_TOOL_CALL  # the job waits for a tool
    STOP = common_pb2.FINISH_REASON_STOP  # EOS or a stop string
    LENGTH = common_pb2.FINISH_REASON_LENGTH  # max_tokens reached


@dataclass(frozen=True)
class Timings:
    """The server's timings of one segment, in the stack's (engine) seconds."""

    queue_wait_s: float
    ttft_s: float
    duration_s: float
    prefill_tokens: int
    decode_tokens: int

    @classmethod
    def from_proto(cls, t: common_pb2.Timings) -> Timings:
        return cls(t.queue_wait_s, t.ttft_s, t.duration_s, t.prefill_tokens, t.decode_tokens)


@dataclass(frozen=True)
class TokenChunk:
    """Tokens of one stream event: `token_ids[0]` is output token `first_index`."""

    first_index: int
    token_ids: tuple[int, ...]
    text: str


@dataclass
class SegmentResult:
    """One finished segment: every token in order, why it ended, and its timings."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    segment_index: int = 0

    @property
    def calls_tool(self) -> bool:
        return self.finish_reason is FinishReason.TOOL_CALL


class _Collector:
    """Checks a RunSegment stream event by event and accumulates its SegmentResult."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.result = SegmentResult()
        self._texts: list[str] = []
        self.finished = False

    def feed(self, ev: agent_pb2.RunSegmentEvent) -> TokenChunk | None:
        if self.finished:
            raise StreamOrderError(f"job {self.job_id!r}: event after the done event")
        kind = ev.WhichOneof("event")
        if kind == "tokens":
            expected = len(self.result.tokens)
            if ev.tokens.first_index != expected:
                raise StreamOrderError(
                    f"job {self.job_id!r}: tokens not contiguous: expected first_index "
                    f"{expected}, got {ev.tokens.first_index}")
            ids = tuple(ev.tokens.token_ids)
            self.result.tokens.extend(ids)
            self._texts.append(ev.tokens.text)
            return TokenChunk(expected, ids, ev.tokens.text)
        if kind == "done":
            d = ev.done
            self.result.finish_reason = FinishReason(d.finish_reason)
            self.result.timings = Timings.from_proto(d.timings)
            self.result.segment_index = d.segment_index
            self.result.text = "".join(self._texts)
            self.finished = True
            return None
        raise StreamOrderError(f"job {self.job_id!r}: event with neither tokens nor done")

    def close(self) -> SegmentResult:
        if not self.finished:
            raise StreamOrderError(f"job {self.job_id!r}: stream ended without a done event")
        return self.result


def _segment_request(job_id: str, prompt_text: str | None, prompt_token_ids, max_tokens,
                     temperature, next_tool_category, top_p=None, seed=None,
                     stop=None, json_schema=None, expected_output_tokens=None,
                     expected_tool_s=None) -> agent_pb2.RunSegmentRequest:
    """The request; `expected_output_tokens` and `expected_tool_s` are the client's hints
    (they replace the control plane's estimates for this segment and its API wait)."""
    if (prompt_text is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt_text and prompt_token_ids")
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed, stop=stop or [],
                                         json_schema=json_schema or "")
    req = agent_pb2.RunSegmentRequest(job_id=job_id, sampling=sampling,
                                      next_tool_category=next_tool_category or "",
                                      expected_output_tokens=expected_output_tokens,
                                      expected_tool_s=expected_tool_s)
    if prompt_text is not None:
        req.prompt_text = prompt_text
    else:
        req.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt_token_ids)))
    return req


@dataclass
class ToolCallHandle:
    """What `tool_call` yields; `observed_duration_s` (the server's view, engine seconds) is
    set when the block exits."""

    job_id: str
    category: str
    observed_duration_s: float | None = None


class SegmentStream:
    """Iterate for `TokenChunk`s as they arrive; afterwards `result` is the SegmentResult."""

    def __init__(self, client: AgentClient, request: agent_pb2.RunSegmentRequest) -> None:
        self._client = client
        self._request = request
        self._collector = _Collector(request.job_id)
        self.result: SegmentResult | None = None

    def __iter__(self) -> Iterator[TokenChunk]:
        backoff = Backoff(self._client.retry)
        while True:  # one attempt each; a retry resumes after the tokens received
            request = resume_request(self._request, len(self._collector.result.tokens),
                                     retry=backoff.retries > 0)
            call = self._client._stub.RunSegment(request, timeout=self._client.timeout,
                                                  metadata=self._client._metadata())
            try:
                for ev in call:
                    chunk = self._collector.feed(ev)
                    if chunk is not None:
                        yield chunk
                break
            except grpc.RpcError as e:
                if self._collector.finished:  # the done arrived, only the close was lost
                    break
                error = _wrap(e, "RunSegment")
            finally:
                call.cancel()  # no-op once the stream is complete; frees the job if abandoned
            delay = backoff.next_delay(error.code)
            if delay is None:
                raise error
            time.sleep(delay)
        self.result = self._collector.close()


_AS_TIMEOUT = object()  # AsyncAgentClient's segment_timeout default: the same as `timeout`


class AsyncSegmentStream:
    """`async for` the `TokenChunk`s as they arrive; afterwards `result` is the SegmentResult."""

    def __init__(self, client: AsyncAgentClient, request: agent_pb2.RunSegmentRequest) -> None:
        self._client = client
        self._request = request
        self._collector = _Collector(request.job_id)
        self.result: SegmentResult | None = None

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        backoff = Backoff(self._client.retry)
        while True:  # one attempt each; a retry resumes after the tokens received
            request = resume_request(self._request, len(self._collector.result.tokens),
                                     retry=backoff.retries > 0)
            call = self._client._stub.RunSegment(request,
                                                  timeout=self._client.segment_timeout,
                                                  metadata=self._client._metadata())
            try:
                async for ev in call:
                    chunk = self._collector.feed(ev)
                    if chunk is not None:
                        yield chunk
                break
            except grpc.RpcError as e:
                if self._collector.finished:  # the done arrived, only the close was lost
                    break
                error = _wrap(e, "RunSegment")
            finally:
                call.cancel()
            delay = backoff.next_delay(error.code)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
        self.result = self._collector.close()


class AgentClient:
    """Blocking client over a `grpc` channel. `timeout` (seconds, None: none) applies to
    each call. Use as a context manager, or call `close()`.

    `api_key` is sent on every call (a control plane with --api-key-file requires one; the
    jobs a key starts are visible to that key only). `tls_ca` (a PEM file) connects over TLS
    and verifies the server against it; `tls_cert` and `tls_key` add a client certificate
    (mutual TLS). Without them the channel is plaintext."""

    # Set to a RetryPolicy to retry calls while the control plane is unavailable (a restart:
    # retry.py says which calls and how); None (the default): an UNAVAILABLE is raised.
    retry: RetryPolicy | None = None

    def __init__(self, address: str = "127.0.0.1:50051", *, channel: grpc.Channel | None = None,
                 timeout: float | None = None, api_key: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self._credentials = ClientCredentials(api_key, tls_ca, tls_cert, tls_key)
        self._own = channel is None
        self._channel = channel or self._credentials.channel(address)
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        if self._own:
            self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return inject_metadata(metadata=self._credentials.metadata)

    def _unary(self, method: str, request):
        if self.retry is not None:
            return self._unary_retried(method, request)
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout,
                                               metadata=self._metadata())
        except grpc.RpcError as e:
            raise _wrap(e, method) from None

    def _unary_retried(self, method: str, request):
        backoff = Backoff(self.retry)
        while True:
            try:
                return getattr(self._stub, method)(request, timeout=self.timeout,
                                                   metadata=self._metadata())
            except grpc.RpcError as e:
                error = _wrap(e, method)
            done = took_effect(method, request, error.code, error.message) \
                if backoff.retries else None
            if done is not None:
                return done
            delay = backoff.next_delay(error.code)
            if delay is None:
                raise error
            time.sleep(delay)

    def start_job(self, job_id: str | None = None, category: str | None = None) -> str:
        """Register a job; returns its id (`job_id`, or one the server assigns; with `retry`
        set, one the client picks, so a retried StartJob cannot start two jobs)."""
        job_id = job_id or (uuid.uuid4().hex if self.retry is not None else None)
        return self._unary("StartJob", agent_pb2.StartJobRequest(
            job_id=job_id or "", category=category or "")).job_id

    def stream_segment(self, job_id: str, prompt_text: str | None = None,
                       prompt_token_ids=None, max_tokens: int | None = None,
                       temperature: float | None = None, next_tool_category: str | None = None,
                       **sampling) -> SegmentStream:
        """Run the job's next segment, yielding `TokenChunk`s as they stream in."""
        return SegmentStream(self, _segment_request(
            job_id, prompt_text, prompt_token_ids, max_tokens, temperature, next_tool_category,
            **sampling))

    def run_segment(self, job_id: str, prompt_text: str | None = None, prompt_token_ids=None,
                    max_tokens: int | None = None, temperature: float | None = None,
                    next_tool_category: str | None = None, **sampling) -> SegmentResult:
        """Run the job's next segment to its end and return every token, the finish reason
        and the timings. `sampling` may add top_p, seed, stop and json_schema, and the hints
        expected_output_tokens and expected_tool_s."""
        stream = self.stream_segment(job_id, prompt_text, prompt_token_ids, max_tokens,
                                     temperature, next_tool_category, **sampling)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    @contextlib.contextmanager
    def tool_call(self, job_id: str, category: str = "") -> Iterator[ToolCallHandle]:
        """Report the tool call's START on entry and its END on exit (also when the block
        raises: the tool returned, if with an error)."""
        self.report_tool_start(job_id, category)
        handle = ToolCallHandle(job_id, category)
        try:
            yield handle
        finally:
            handle.observed_duration_s = self.report_tool_end(job_id, category)

    def report_tool_start(self, job_id: str, category: str = "") -> None:
        """The job's tool was invoked (for a caller whose tool call spans more than a block,
        such as the time between two HTTP requests)."""
        self._unary("ReportToolCall", agent_pb2.ReportToolCallRequest(
            job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_START, category=category))

    def report_tool_end(self, job_id: str, category: str = "") -> float:
        """The job's tool returned; returns the call's duration as the server saw it."""
        return self._unary("ReportToolCall", agent_pb2.ReportToolCallRequest(
            job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_END,
            category=category)).observed_duration_s

    def end_job(self, job_id: str) -> common_pb2.JobStatus:
        """The job is complete; returns its final `JobStatus`."""
        return self._unary("EndJob", agent_pb2.EndJobRequest(job_id=job_id)).status

    def cancel_job(self, job_id: str, reason: str = "") -> None:
        self._unary("CancelJob", agent_pb2.CancelJobRequest(job_id=job_id, reason=reason))

    def get_job(self, job_id: str) -> common_pb2.JobStatus:
        return self._unary("GetJob", agent_pb2.GetJobRequest(job_id=job_id))


class AsyncAgentClient:
    """`AgentClient` over `grpc.aio`: the same methods, awaited (`stream_segment` is used with
    `async for`, `tool_call` with `async with`). `segment_timeout` bounds a RunSegment call
    (default: `timeout`, as for every call); a server such as the gateway bounds its short
    calls but not a segment, which takes what it takes. `api_key` and the TLS files: as for
    `AgentClient`."""

    retry: RetryPolicy | None = None  # as for AgentClient

    def __init__(self, address: str = "127.0.0.1:50051", *,
                 channel: grpc.aio.Channel | None = None, timeout: float | None = None,
                 segment_timeout: float | None | object = _AS_TIMEOUT, api_key: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self._credentials = ClientCredentials(api_key, tls_ca, tls_cert, tls_key)
        self._own = channel is None
        self._channel = channel or self._credentials.aio_channel(address)
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self.timeout = timeout
        self.segment_timeout = timeout if segment_timeout is _AS_TIMEOUT else segment_timeout

    async def close(self) -> None:
        if self._own:
            await self._channel.close()

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return inject_metadata(metadata=self._credentials.metadata)

    async def _unary(self, method: str, request):
        if self.retry is not None:
            return await self._unary_retried(method, request)
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout,
                                                     metadata=self._metadata())
        except grpc.RpcError as e:
            raise _wrap(e, method) from None

    async def _unary_retried(self, method: str, request):
        backoff = Backoff(self.retry)
        while True:
            try:
                return await getattr(self._stub, method)(request, timeout=self.timeout,
                                                         metadata=self._metadata())
            except grpc.RpcError as e:
                error = _wrap(e, method)
            done = took_effect(method, request, error.code, error.message) \
                if backoff.retries else None
            if done is not None:
                return done
            delay = backoff.next_delay(error.code)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    async def start_job(self, job_id: str | None = None, category: str | None = None) -> str:
        job_id = job_id or (uuid.uuid4().hex if self.retry is not None else None)
        return (await self._unary("StartJob", agent_pb2.StartJobRequest(
            job_id=job_id or "", category=category or ""))).job_id

    def stream_segment(self, job_id: str, prompt_text: str | None = None,
                       prompt_token_ids=None, max_tokens: int | None = None,
                       temperature: float | None = None, next_tool_category: str | None = None,
                       **sampling) -> AsyncSegmentStream:
        return AsyncSegmentStream(self, _segment_request(
            job_id, prompt_text, prompt_token_ids, max_tokens, temperature, next_tool_category,
            **sampling))

    async def run_segment(self, job_id: str, prompt_text: str | None = None,
                          prompt_token_ids=None, max_tokens: int | None = None,
                          temperature: float | None = None,
                          next_tool_category: str | None = None, **sampling) -> SegmentResult:
        stream = self.stream_segment(job_id, prompt_text, prompt_token_ids, max_tokens,
                                     temperature, next_tool_category, **sampling)
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    @contextlib.asynccontextmanager
    async def tool_call(self, job_id: str, category: str = "") -> AsyncIterator[ToolCallHandle]:
        await self.report_tool_start(job_id, category)
        handle = ToolCallHandle(job_id, category)
        try:
            yield handle
        finally:
            handle.observed_duration_s = await self.report_tool_end(job_id, category)

    async def report_tool_start(self, job_id: str, category: str = "") -> None:
        await self._unary("ReportToolCall", agent_pb2.ReportToolCallRequest(
            job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_START, category=category))

    async def report_tool_end(self, job_id: str, category: str = "") -> float:
        return (await self._unary("ReportToolCall", agent_pb2.ReportToolCallRequest(
            job_id=job_id, phase=agent_pb2.TOOL_CALL_PHASE_END,
            category=category))).observed_duration_s

    async def end_job(self, job_id: str) -> common_pb2.JobStatus:
        return (await self._unary("EndJob", agent_pb2.EndJobRequest(job_id=job_id))).status

    async def cancel_job(self, job_id: str, reason: str = "") -> None:
        await self._unary("CancelJob", agent_pb2.CancelJobRequest(job_id=job_id, reason=reason))

    async def get_job(self, job_id: str) -> common_pb2.JobStatus:
        return await self._unary("GetJob", agent_pb2.GetJobRequest(job_id=job_id))
