"""The engine backend interface of a worker, and what a backend reports back.

A worker process owns one backend: the simulated engine running in real time
(`worker/sim/backend.py`) or vLLM (`worker/vllm/backend.py`). The worker feeds it the control
plane's plan actions in order (`apply`), forwards what it reports (`events`) on the
worker ↔ control-plane stream, and sends its memory (`view`) when asked.

Conventions every backend follows:
* `generated_tokens` in `SegmentEnded` and `SegmentPreempted` count the tokens of *this
  admission* (what `Scheduler.segment_ended` / `segment_preempted` take); a segment resumed
  after a preemption is a new admission with a smaller `max_tokens`.
* `TokensGenerated.first_index` counts from the start of the segment (proto `JobTokens`):
  the admission's first token has index `SegmentInput.first_index`. Every token is reported
  exactly once, in order, before the `SegmentEnded` / `SegmentPreempted` that ends it.
* Times and durations are in engine time (seconds), which is wall time for a real engine.
* An action the engine cannot carry out raises `BackendError` and changes nothing. A dead
  engine raises `BackendFailed`: from `apply`, and from the `events()` iterator after the
  events emitted before the failure.

Below the interface: what both engine backends share (`EngineBackend`: the frame of `apply`
with its checks, the admissions being reported, failing) and what their engines report to
them (`EngineError`, `EngineSegmentEnded`, and `astraea.plan.StepTiming`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from astraea.plan import (
    Abort,
    Admit,
    Evict,
    KvAction,
    Pause,
    Preempt,
    StepTiming,
    WireAction,
    WorkerInfo,
    WorkerView,
)


class BackendError(RuntimeError):
    """A plan action the engine cannot carry out (unknown job, wrong state, no room).

    The backend's state is unchanged; the worker reports it and carries on. `retryable` is
    False when the job itself can never run on this engine (its context and budget exceed
    the model's window, it has no input), so that the control plane fails the job with the
    reason instead of queueing it again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class EngineError(BackendError):
    """The engine itself refused an action (`SimulatedEngine`, `VllmEngine`): the job is
    unknown there, its KV is not where the action needs it, or there is no room.

    An engine checks before it changes any state, so, like every `BackendError`, it leaves
    the engine as it was, and a backend passes it on as its refusal of the plan action. The
    plain `BackendError`s are what a backend refuses before reaching its engine (a malformed
    action, a backend not running)."""


class BackendFailed(RuntimeError):
    """The engine itself failed (did not start, or died): the worker reports it and exits."""


ContextPiece = str | tuple[int, ...]  # a prompt's text, or token ids (prompt or output)


@dataclass(frozen=True)
class Sampling:
    """How a segment samples (proto `SamplingParams`, defaults already filled in by the
    control plane). A backend that cannot sample (the simulated engine) ignores it."""

    temperature: float = 0.0  # 0: greedy, so a worker driven directly is token-exact
    top_p: float = 1.0
    seed: int | None = None  # None: the engine's own random state
    stop: tuple[str, ...] = ()  # the segment ends before the first match, which is not output
    json_schema: str | None = None  # a JSON schema the output text must match


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
    # The segment's sampling; every admission of the segment (after a preemption too)
    # carries the same. None: greedy, no stop strings, no schema.
    sampling: Sampling | None = None


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokensGenerated:
    """New tokens of a job's segment, in order (proto `JobTokens`)."""

    job_id: str
    token_ids: tuple[int, ...]
    first_index: int
    text: str = ""  # their text, if the backend detokenizes


@dataclass(frozen=True)
class SegmentEnded:
    """An admission generated its last token (proto `SegmentEnded`); the job's KV stays
    resident until a Pause."""

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
class MemoryChanged:
    """The worker's memory after a change (proto `MemoryReport`)."""

    view: WorkerView


BackendEvent = TokensGenerated | SegmentEnded | SegmentPreempted | StepTiming | MemoryChanged


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


# --- what an engine reports to its backend -------------------------------------------------


@dataclass(frozen=True)
class EngineSegmentEnded:
    """A segment's end as an engine's step reports it: what `SegmentEnded` says without the
    admission's timings (ttft, duration), which the backend measures (`Admission.ended`)."""

    job_id: str
    generated_tokens: int  # tokens of this admission
    prefill_tokens: int  # tokens prefilled before its first token (new plus recomputed)
    finish_reason: str | None = None  # vLLM's ("length" or "stop"); the simulated engine: None


# --- what the engine backends share ----------------------------------------------------------


@dataclass
class Admission:
    """A running admission as its backend reports it, from the Admit to the end or
    preemption of its segment."""

    admitted_s: float  # engine time of the Admit
    first_index: int  # index in the segment's output of the admission's first token
    emitted: int = 0  # tokens of this admission reported so far
    first_token_s: float | None = None

    @property
    def next_index(self) -> int:
        """Index in the segment's output of the next token to report."""
        return self.first_index + self.emitted

    def first_token(self, now: float) -> None:
        """Note the time of the admission's first token (later calls change nothing)."""
        if self.first_token_s is None:
            self.first_token_s = now

    def ended(self, end: EngineSegmentEnded, now: float) -> SegmentEnded:
        """The event of the segment's end at `now`. Only a model's own stop is reported as a
        finish reason; a length end leaves the reason to the control plane's hint rule."""
        first = self.first_token_s if self.first_token_s is not None else now
        return SegmentEnded(end.job_id, end.generated_tokens, end.prefill_tokens,
                            first - self.admitted_s, now - self.admitted_s,
                            finish_reason="stop" if end.finish_reason == "stop" else None)


ActionHandler = Callable[[WireAction, SegmentInput | None], SegmentPreempted | None]


def check_action(action: WireAction, segment: SegmentInput | None) -> None:
    """What every backend refuses before its engine sees the action: an Admit without its
    segment input or with a negative first index, a Preempt or Evict that keeps the KV."""
    j = action.job_id
    if isinstance(action, Admit):
        if segment is None:
            raise BackendError(f"job {j}: an Admit needs its SegmentInput (max_tokens)")
        if segment.first_index < 0:
            raise BackendError(f"job {j}: first_index must not be negative")
    elif isinstance(action, Preempt) and action.action is KvAction.PRESERVE:
        raise BackendError(f"job {j}: a preemption must SWAP or DISCARD")
    elif isinstance(action, Evict) and action.action is KvAction.PRESERVE:
        raise BackendError(f"job {j}: an eviction must SWAP or DISCARD")


class EngineBackend:
    """What both engine backends share: the event queue, the admissions being reported, the
    failure that ends the backend, `stop`, and the frame of `apply`: refuse once failed or
    not running, check the action (`check_action`), hand it to the handler for its type
    (`_handlers`, a table rather than a chain of type tests), pass a refusal (`BackendError`,
    an engine's `EngineError` included) on as it is and turn anything else into the
    backend's failure.

    A subclass provides the handlers (`_admit` … `_abort`), where they run (`_carry_out`),
    what follows a carried out action (`_applied`), and the rest of `Backend`."""

    engine_name = "engine"  # names the engine in the BackendFailed message

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None  # the stepping task
        self._failed: BackendFailed | None = None
        self._stopped = False
        self._admissions: dict[str, Admission] = {}  # by job, on the thread that steps
        self._handlers: dict[type, ActionHandler] = {
            Admit: self._admit, Pause: self._pause, Evict: self._evict,
            Preempt: self._preempt, Abort: self._abort}

    # --- the frame ----------------------------------------------------------------------
    async def apply(self, action: WireAction,
                    segment: SegmentInput | None = None) -> SegmentPreempted | None:
        if self._failed is not None:
            raise self._failed
        if self._task is None or self._stopped:
            raise BackendError("backend is not running")
        try:
            out = await self._carry_out(action, segment)
        except BackendError:
            raise
        except Exception as exc:  # not a refused action: the engine's state is suspect
            raise self._fail(exc) from exc
        self._applied()
        return out

    def _dispatch(self, action: WireAction,
                  segment: SegmentInput | None) -> SegmentPreempted | None:
        """Check `action` and run its handler (where `_carry_out` runs it)."""
        handler = self._handlers.get(type(action))
        if handler is None:
            raise BackendError(f"not a plan action: {action!r}")
        check_action(action, segment)
        return handler(action, segment)

    async def _carry_out(self, action: WireAction,
                         segment: SegmentInput | None) -> SegmentPreempted | None:
        """`_dispatch(action, segment)` where the engine lives, and report what changed."""
        raise NotImplementedError

    def _applied(self) -> None:
        """After an action was carried out: let the stepping task see it."""
        raise NotImplementedError

    # --- the handlers, one per action type ----------------------------------------------
    def _admit(self, a: Admit, segment: SegmentInput) -> None:
        raise NotImplementedError

    def _pause(self, a: Pause, segment: None) -> None:
        raise NotImplementedError

    def _evict(self, a: Evict, segment: None) -> None:
        raise NotImplementedError

    def _preempt(self, a: Preempt, segment: None) -> SegmentPreempted:
        raise NotImplementedError

    def _abort(self, a: Abort, segment: None) -> None:
        raise NotImplementedError

    # --- lifecycle and failure ----------------------------------------------------------
    def events(self) -> AsyncIterator[BackendEvent]:
        return queued_events(self._queue)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._close()
        if self._failed is None:
            self._queue.put_nowait(END_OF_EVENTS)

    async def _close(self) -> None:
        """Release the engine, once the stepping task has stopped."""

    def _fail(self, exc: Exception) -> BackendFailed:
        """The engine broke: fail every later call, end `events()` with the failure and
        stop stepping. Returns the failure (the first one, if it had failed already)."""
        if self._failed is None:
            self._failed = BackendFailed(f"{self.engine_name} on worker {self.worker_id} "
                                         f"failed: {type(exc).__name__}: {exc}")
            self._failed.__cause__ = exc
            self._queue.put_nowait(self._failed)
            if self._task is not None and self._task is not asyncio.current_task():
                self._task.cancel()
        return self._failed
