"""Retrying calls while the control plane is unavailable (restarting, say), for the clients.

Only UNAVAILABLE is retried (the server could not be reached or its connection broke), with
exponential backoff and jitter, until `RetryPolicy.total_s` has passed since the call began.
Only calls that are safe to send twice are retried, and a retry that finds its first attempt
already took effect counts as a success:

* StartJob: with a job id (the client picks one when none is given): ALREADY_EXISTS on a retry
  means an earlier attempt started it.
* ReportToolCall: a retried START refused as "already open", or END refused as "without
  START", was applied by an earlier attempt (END's observed duration is then 0).
* GetJob, EndJob, CancelJob: the same answer however often they are sent.
* RunSegment: sent again with `resume_from_index` = the tokens received so far; a durable
  control plane continues the stream from there (no token twice, none missing).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from astraea.v1 import agent_pb2


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry a call the control plane could not take."""

    total_s: float = 30.0  # give up (raise the last error) this long after the first attempt
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not self.total_s >= 0 or not self.initial_backoff_s > 0 \
                or not self.max_backoff_s >= self.initial_backoff_s or not self.multiplier >= 1:
            raise ValueError(f"bad RetryPolicy {self}: total_s >= 0, initial_backoff_s > 0, "
                             "max_backoff_s >= initial_backoff_s and multiplier >= 1")


class Backoff:
    """The retry state of one call: `next_delay(error)` is how long to sleep before trying
    again, or None to give up (not retryable, or out of time)."""

    def __init__(self, policy: RetryPolicy | None) -> None:
        self.policy = policy
        self.retries = 0
        self._deadline = time.monotonic() + (policy.total_s if policy else 0.0)
        self._delay = policy.initial_backoff_s if policy else 0.0

    def next_delay(self, code: grpc.StatusCode) -> float | None:
        p = self.policy
        if p is None or code is not grpc.StatusCode.UNAVAILABLE:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        delay = min(self._delay * random.uniform(0.5, 1.0), left)  # jitter: no herd
        self._delay = min(self._delay * p.multiplier, p.max_backoff_s)
        self.retries += 1
        return delay


def took_effect(method: str, request, code: grpc.StatusCode, message: str):
    """The answer to give for a retried call refused because an earlier attempt already
    took effect; None if the refusal is a real error."""
    if method == "StartJob" and code is grpc.StatusCode.ALREADY_EXISTS and request.job_id:
        return agent_pb2.StartJobResponse(job_id=request.job_id)
    if method == "ReportToolCall" and code is grpc.StatusCode.FAILED_PRECONDITION:
        start = request.phase == agent_pb2.TOOL_CALL_PHASE_START
        if (start and "already open" in message) or (not start and "without START" in message):
            return agent_pb2.ReportToolCallResponse()
    return None


def resume_request(request: agent_pb2.RunSegmentRequest, received: int,
                   retry: bool) -> agent_pb2.RunSegmentRequest:
    """`request` for an attempt: the first as it is, a `retry` with the tokens received."""
    if not retry:
        return request
    again = agent_pb2.RunSegmentRequest()
    again.CopyFrom(request)
    again.resume_from_index = received
    return again
