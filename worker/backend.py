"""The engine backend interface of a worker, and what a backend reports back.

A worker process owns one backend: the simulated engine running in real time
(`worker/sim/backend.py`) or a real engine (vLLM, issue #4). The worker feeds it the control
plane's plan actions in order (`apply`), forwards what it reports (`events`) on the
worker ↔ control-plane stream, and sends its memory (`view`) when asked.

Conventions every backend follows:
* `generated_tokens` in `SegmentFinished` and `SegmentPreempted` count the tokens of *this
  admission* (what `Scheduler.segment_ended` / `segment_preempted` take); a segment resumed
  after a preemption is a new admission with a smaller `max_tokens`.
* `TokensGenerated.first_index` counts from the start of the segment (proto `JobTokens`):
  the admission's first token has index `SegmentInput.first_index`. Every token is reported
  exactly once, in order, before the `SegmentFinished` / `SegmentPreempted` that ends it.
* Times and durations are in engine time (seconds), which is wall time for a real engine.
* An action the engine cannot carry out raises `BackendError` and changes nothing. A dead
  engine raises `BackendFailed`: from `apply`, and from the `events()` iterator after the
  events emitted before the failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from astraea.plan import KvAction, WireAction, WorkerInfo, WorkerView


class BackendError(RuntimeError):
    """A plan action the engine cannot carry out (unknown job, wrong state, no room).

    The backend's state is unchanged; the worker reports it and carries on. `retryable` is
    False when the job itself can never run on this engine (its context and budget exceed
    the model's window, it has no input), so that the control plane fails the job with the
    reason instead of queueing it again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class BackendFailed(RuntimeError):
    """The engine itself failed (did not start, or died): the worker reports it and exits."""


ContextPiece = str | tuple[int, ...]  # a prompt's text, or token ids (prompt or output)


@dataclass(frozen=True)
class SegmentInput:
    """The segment data an `Admit` needs beyond the core's plan action (proto `Admit`)."""

    max_tokens: int  # tokens this admission generates at most (the simulated backend: exactly)
    first_index: int = 0  # index in the segment's output of this admission's first token
    prompt_token_ids: tuple[int, ...] | None = None  # the new tokens (a real engine needs them)
    prompt_text: str | None = None  # the new input as text, when the client sent text
    # The job's whole history, when the worker does not hold it and must recompute it (a job
    # placed on another worker): each prompt as the client sent it (text or ids) and each
    # output as ids, in order. Prompt texts are tokenized one by one, exactly as they were
    # when first admitted, so the recomputed ids are the ones the first worker had.
    context: tuple[ContextPiece, ...] | None = None


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokensGenerated:
    """New tokens of a job's segment, in order (proto `JobTokens`)."""

    job_id: str
    token_ids: tuple[int, ...]
    first_index: int
    text: str = ""  # their text, if the backend detokenizes


@dataclass(frozen=True)
class SegmentFinished:
    """An admission generated its last token; the job's KV stays resident until a Pause."""

    job_id: str
    generated_tokens: int
    prefill_tokens: int  # tokens prefilled for it (new plus recomputed context)
    ttft_s: float  # admission to first token
    duration_s: float  # admission to end
    # "stop" when the model ended the segment itself (EOS, a stop string); None when it
    # reached max_tokens, and the control plane's hint rule decides TOOL_CALL or LENGTH.
    finish_reason: str | None = None


@dataclass(frozen=True)
class SegmentPreempted:
    """A running segment was stopped, by a `Preempt` or by the engine when out of blocks."""

    job_id: str
    generated_tokens: int
    action: KvAction  # what was done with its KV: SWAP or DISCARD


@dataclass(frozen=True)
class StepTimed:
    """One engine step (proto `StepTiming`; the predictor fits step time from these)."""

    tokens: int  # tokens processed (decoded plus prefilled)
    context_tokens_read: int  # KV tokens read by the step's attention
    duration_s: float


@dataclass(frozen=True)
class MemoryChanged:
    """The worker's memory after a change (proto `MemoryReport`)."""

    view: WorkerView


BackendEvent = TokensGenerated | SegmentFinished | SegmentPreempted | StepTimed | MemoryChanged


# --- the interface --------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """An engine a worker drives. All methods are called from the worker's event loop."""

    async def start(self) -> None:
        """Start the engine (load the model, allocate the KV cache); raises `BackendFailed`."""

    async def stop(self) -> None:
        """Stop stepping and release the engine; `events()` then ends. Idempotent."""

    async def release(self, job_id: str) -> None:
        """Free whatever KV the job holds (GPU blocks, host copy) but keep what the engine
        needs to recompute it on its next admission (a real engine: its token history).
        The worker calls it after refusing the job's Admit. A job it does not hold: no-op."""

    def describe(self) -> WorkerInfo:
        """Model, capacities and limits, for registration. Valid after `start()`."""

    async def apply(self, action: WireAction,
                    segment: SegmentInput | None = None) -> SegmentPreempted | None:
        """Carry out one plan action (`segment` is required for an `Admit`). A `Preempt`
        returns what was done (also emitted as an event); `Abort` of a job not held is a no-op.
        Raises `BackendError` (nothing changed) or `BackendFailed`."""

    def events(self) -> AsyncIterator[BackendEvent]:
        """Everything the engine reports, in order; one consumer. Ends after `stop()`,
        raises `BackendFailed` if the engine dies."""

    def view(self) -> WorkerView:
        """The worker's memory now."""


END_OF_EVENTS = object()  # put on a backend's event queue when it stops


async def queued_events(queue: asyncio.Queue) -> AsyncIterator[BackendEvent]:
    """A backend's `events()`: what it puts on `queue`, in order, until `END_OF_EVENTS`;
    a `BackendFailed` put there is raised to the consumer."""
    while True:
        item = await queue.get()
        if item is END_OF_EVENTS:
            return
        if isinstance(item, BackendFailed):
            raise item
        yield item
