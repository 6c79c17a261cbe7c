"""The simulated engine as a worker backend, running in real time on asyncio.

`SimulatedEngine` is driven from outside; here one stepping task drives it against a clock:
while the engine has work it starts a step, sleeps the step's duration (× `time_scale`), and
finishes it; swap copies complete when their time comes (also mid-step); a sequence waiting
for its swap-in starts when the copy lands; an `apply` wakes the task. Tokens are
placeholders (`placeholder_token`), step durations follow the profile.

Engine time is ``(clock() − start) / time_scale`` seconds: `time_scale < 1` runs faster than
real time (tests), and every time or duration reported is in engine time.

A bad plan action raises `BackendError` and leaves the engine as it was: the checks every
backend makes come first (`worker.backend.check_action`), then the engine's own, which it
makes before it changes any state (an `EngineError`, passed on as it is).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

from astraea.plan import (
    Abort,
    Admit,
    Evict,
    KvAction,
    Pause,
    Preempt,
    WireAction,
    WorkerInfo,
    WorkerView,
)
from astraea.profile import HardwareProfile
from worker.backend import (
    Admission,
    BackendError,
    BackendEvent,
    EngineBackend,
    MemoryChanged,
    SegmentInput,
    SegmentPreempted,
    StepTiming,
    TokensGenerated,
)
from worker.sim.engine import SimulatedEngine

VOCAB = 32000


def placeholder_token(job_id: str, index: int) -> int:
    """The simulated backend's token at `index` of a job's segment (stable across runs)."""
    return (zlib.crc32(job_id.encode()) + index) % VOCAB


class SimulatedBackend(EngineBackend):
    """`worker.backend.Backend` over `SimulatedEngine`, stepping in (scaled) real time."""

    engine_name = "simulated engine"

    def __init__(self, profile: HardwareProfile, worker_id: int = 0,
                 kv_blocks: int | None = None, time_scale: float = 1.0,
                 clock: Callable[[], float] | None = None) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        super().__init__(worker_id)
        self.profile = profile
        self.engine = SimulatedEngine(profile, worker_id, kv_blocks)
        self.time_scale = time_scale
        self._clock = clock
        self._origin = 0.0
        self._waiter: asyncio.Future | None = None
        self._step_end = 0.0
        self._step_shape: tuple[int, int] = (0, 0)
        self._last_memory: tuple | None = None
        self.max_lag_s = 0.0  # how far (engine s) reports have trailed the step timeline

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise BackendError("backend already started")
        loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = loop.time
        self._origin = self._clock()
        self._task = loop.create_task(self._run(), name=f"sim-backend-{self.engine.worker_id}")
        self._memory_changed()

    def describe(self) -> WorkerInfo:
        p = self.profile
        # needs_history=False: the simulated engine recomputes a context from its token count.
        return WorkerInfo(model=p.model, backend="sim", needs_history=False,
                          kv_capacity_blocks=self.engine.pool.total,
                          block_size=p.block_size, host_swap_blocks=self.engine.host_total,
                          max_num_seqs=p.max_num_seqs,
                          max_num_batched_tokens=p.max_num_batched_tokens, profile_name=p.name)

    def now(self) -> float:
        """Engine time: seconds since `start()`, divided by `time_scale`."""
        return (self._clock() - self._origin) / self.time_scale

    def view(self) -> WorkerView:
        return self.engine.view()

    # --- plan actions (on the event loop, like the stepping) ----------------------------
    async def _carry_out(self, action: WireAction,
                         segment: SegmentInput | None) -> SegmentPreempted | None:
        return self._dispatch(action, segment)

    def _applied(self) -> None:
        self._memory_changed()
        self._wake()

    def _admit(self, a: Admit, segment: SegmentInput) -> None:
        now = self._engine_now()
        # The engine checks the rest (room, context, state, counts) before changing anything.
        self.engine.admit(a.job_id, a.new_tokens, a.context_tokens, segment.max_tokens,
                          a.swap_in, now, a.priority)
        self._admissions[a.job_id] = Admission(now, segment.first_index)

    def _pause(self, a: Pause, segment: None) -> None:
        self.engine.pause(a.job_id, a.action, self._engine_now())

    def _evict(self, a: Evict, segment: None) -> None:
        self.engine.evict(a.job_id, a.action, self._engine_now())

    def _preempt(self, a: Preempt, segment: None) -> SegmentPreempted:
        generated, taken = self.engine.preempt(a.job_id, a.action, self._engine_now())
        self._flush_tokens(a.job_id, generated)
        return self._preempted(a.job_id, generated, taken)

    def _abort(self, a: Abort, segment: None) -> None:
        self._free(a.job_id, self._engine_now())

    async def release(self, job_id: str) -> None:
        """Free the job's GPU blocks or host copy, as an Abort does (the simulated engine
        recomputes from counts alone: there is no history to keep)."""
        if self._failed is not None or self._task is None or self._stopped:
            return
        try:
            self._free(job_id, self._engine_now())
        except Exception as exc:  # nothing here is a refusal: the engine's state is suspect
            raise self._fail(exc) from exc
        self._memory_changed()
        self._wake()

    def _free(self, job_id: str, now: float) -> None:
        """Drop whatever the engine holds for the job: a running segment (discarded, no
        report), GPU blocks, a host copy."""
        e = self.engine
        if job_id in e.running:
            e.preempt(job_id, KvAction.DISCARD, now)
            self._admissions.pop(job_id, None)
        e.release(job_id)

    # --- stepping -----------------------------------------------------------------------
    async def _run(self) -> None:
        e = self.engine
        try:
            while True:
                now = self._engine_now()
                nxt = e.next_transfer_s()
                if nxt is not None and nxt <= now:
                    e.complete_transfers(now)
                    self._memory_changed()
                if e.busy:
                    if now >= self._step_end:
                        self._finish_step(now)
                        if e.has_work(now):  # back to back, as the GPU would run them
                            self._start_step(now)
                        # Catching up, one step at a time: plans and the sender run between.
                        await asyncio.sleep(0)
                        continue
                    deadline = self._step_end
                elif e.has_work(now):
                    self._start_step(now)
                    if e.busy:
                        continue
                    deadline = None
                else:
                    deadline = e.next_ready_s(now)
                nxt = e.next_transfer_s()
                if nxt is not None:
                    deadline = nxt if deadline is None else min(deadline, nxt)
                await self._sleep_until(deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine broke: report it, accept nothing more
            self._fail(exc)

    def _engine_now(self) -> float:
        """The engine's time: the clock's, except that a step the event loop ends late (a
        busy host: this process also serialises and sends every token) ends when its
        duration says, and the next one starts then. The timeline of steps follows the cost
        model, as on a GPU, and only the reports are late; `max_lag_s` records by how much.
        Without this, at small time scales host overhead would pass for GPU time."""
        now = self.now()
        if self.engine.busy and now > self._step_end:
            lag = now - self._step_end
            if lag > self.max_lag_s:
                self.max_lag_s = lag
            return self._step_end
        return now

    async def _sleep_until(self, deadline: float | None) -> None:
        """Wait for `deadline` (engine time) or an `apply`, whichever comes first."""
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        handle = None
        if deadline is not None:
            delay = max(deadline - self.now(), 0.0) * self.time_scale
            handle = loop.call_later(delay, self._wake)
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _start_step(self, now: float) -> None:
        e = self.engine
        duration, result = e.start_step(now)
        for job_id, generated in result.preempted:
            self._flush_tokens(job_id, generated)
            self._preempted(job_id, generated, KvAction.DISCARD)
        if result.preempted:
            self._memory_changed()
        if e.busy:
            self._step_end = now + duration
            self._step_shape = self._shape_of_step()

    def _shape_of_step(self) -> tuple[int, int]:
        """(tokens, context tokens read) of the step just planned."""
        return self.engine.last_step_tokens, self.engine.last_step_context_read

    def _finish_step(self, now: float) -> None:
        e = self.engine
        duration = e.last_step_s
        result = e.finish_step(now)
        self._emit(StepTiming(*self._step_shape, duration))
        for job_id in result.first_token:
            adm = self._admissions.get(job_id)
            if adm is not None:
                adm.first_token(now)
        ended = {end.job_id: end for end in result.ended}
        for job_id in list(self._admissions):
            end = ended.get(job_id)
            self._flush_tokens(job_id, end.generated_tokens if end else None)
        for end in result.ended:
            self._emit(self._admissions.pop(end.job_id).ended(end, now))
        self._memory_changed()

    # --- reporting ----------------------------------------------------------------------
    def _flush_tokens(self, job_id: str, generated: int | None = None) -> None:
        """Report the tokens of `job_id`'s admission not reported yet (up to `generated`)."""
        adm = self._admissions.get(job_id)
        if adm is None:
            return
        if generated is None:
            if job_id not in self.engine.running:
                return
            generated = self.engine.generated_of(job_id)
        if generated > adm.emitted:
            start = adm.next_index
            ids = tuple(placeholder_token(job_id, i)
                        for i in range(start, adm.first_index + generated))
            adm.emitted = generated
            self._emit(TokensGenerated(job_id, ids, start))

    def _preempted(self, job_id: str, generated: int, action: KvAction) -> SegmentPreempted:
        self._admissions.pop(job_id, None)
        event = SegmentPreempted(job_id, generated, action)
        self._emit(event)
        return event

    def _memory_changed(self) -> None:
        """Emit the memory view if anything the scheduler plans with has changed."""
        v = self.engine.view()
        key = (v.total_blocks, v.free_blocks, v.host_free_blocks, v.running_seqs,
               v.swapping_out_blocks)
        if key != self._last_memory:
            self._last_memory = key
            self._emit(MemoryChanged(v))

    def _emit(self, event: BackendEvent) -> None:
        self._queue.put_nowait(event)
