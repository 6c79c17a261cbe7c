"""The worker backend interface and the simulated backend running in (scaled) real time.

Runs with time_scale 0.001: a 10 ms step of the "simple" profile (conftest) takes 10 µs of
wall time. Times asserted are engine time, and only as lower bounds (the loop's overhead
stretches engine time, never shrinks it). Every backend here checks, as it emits each memory
view, that the view and the engine's block accounting agree.
"""

from __future__ import annotations

import asyncio

import pytest

from astraea.plan import Abort, Admit, Evict, KvAction, Pause, Preempt
from worker.backend import (
    Backend,
    BackendError,
    BackendFailed,
    MemoryChanged,
    SegmentEnded,
    SegmentInput,
    SegmentPreempted,
    StepTiming,
    TokensGenerated,
)
from worker.sim.backend import SimulatedBackend, placeholder_token

SCALE = 0.001
BS = 16


def blocks(tokens: int) -> int:
    return -(-tokens // BS)


class CheckedBackend(SimulatedBackend):
    """Records every inconsistency between an emitted memory view and the engine."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.violations: list[str] = []

    def _emit(self, event) -> None:
        if isinstance(event, MemoryChanged):
            self._check(event.view)
        super()._emit(event)

    def _check(self, v) -> None:
        e, pool = self.engine, self.engine.pool
        held_by_jobs = sum(e.blocks_of(j) for j in [*e.running, *e.held])
        in_flight_out = sum(t.blocks for t in e.transfers if t.direction.startswith("out"))
        checks = {
            "total": v.total_blocks == pool.total,
            "free": v.free_blocks == pool.allocatable,
            "pool sums": pool.free + pool.cached_total + pool.used == pool.total,
            "nothing negative": min(pool.free, pool.cached_total, pool.used) >= 0,
            "used = held by jobs": pool.used == held_by_jobs + in_flight_out,
            "host": v.host_free_blocks == e.host_total - e.host_used
            and 0 <= e.host_used <= e.host_total,
            "running": v.running_seqs == len(e.running),
        }
        self.violations += [f"step {e.step}: {k}" for k, ok in checks.items() if not ok]


class Harness:
    """A started backend, its event stream, and what it has emitted so far."""

    def __init__(self, profile, **kwargs) -> None:
        self.b = CheckedBackend(profile, time_scale=SCALE, **kwargs)
        self.events: list = []

    async def __aenter__(self) -> Harness:
        await self.b.start()
        self._it = self.b.events().__aiter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.b.stop()
        assert not self.b.violations, self.b.violations[:5]

    async def next(self):
        ev = await asyncio.wait_for(self._it.__anext__(), 2.0)
        self.events.append(ev)
        return ev

    async def until(self, pred):
        while True:
            ev = await self.next()
            if pred(ev):
                return ev

    async def finished(self, job_id: str) -> SegmentEnded:
        return await self.until(lambda ev: isinstance(ev, SegmentEnded) and ev.job_id == job_id)

    async def idle(self):
        """Wait until the engine holds nothing in flight and the stream is drained."""
        e = self.b.engine
        while e.running or e.transfers or not self.b._queue.empty():
            await self.next()

    def tokens(self, job_id: str) -> list[tuple[int, int]]:
        """(index, id) of every token streamed for the job, in stream order."""
        return [(ev.first_index + i, t) for ev in self.events
                if isinstance(ev, TokensGenerated) and ev.job_id == job_id
                for i, t in enumerate(ev.token_ids)]

    async def admit(self, job_id, new, context=0, max_tokens=10, swap_in=False, first_index=0):
        return await self.b.apply(Admit(job_id, 0, new, context, swap_in),
                                  SegmentInput(max_tokens, first_index))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def expected(job_id: str, start: int, stop: int) -> list[tuple[int, int]]:
    return [(i, placeholder_token(job_id, i)) for i in range(start, stop)]


# --- the interface --------------------------------------------------------------------------


def test_simulated_backend_implements_the_interface_and_describes_itself(simple_profile):
    b = SimulatedBackend(simple_profile, kv_blocks=100)
    assert isinstance(b, Backend)
    info = b.describe()
    assert (info.backend, info.model, info.profile_name) == ("sim", "toy", "simple")
    assert (info.kv_capacity_blocks, info.block_size, info.max_num_seqs,
            info.max_num_batched_tokens) == (100, 16, 8, 64)
    assert info.host_swap_blocks == simple_profile.host_swap_blocks
    with pytest.raises(ValueError):
        SimulatedBackend(simple_profile, time_scale=0)


# --- segments -------------------------------------------------------------------------------


def test_a_segment_streams_exactly_max_tokens_in_order_each_once(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            await h.admit("a", new=100, max_tokens=37)
            end = await h.finished("a")
            assert h.tokens("a") == expected("a", 0, 37)
            assert (end.generated_tokens, end.prefill_tokens) == (37, 100)
            # Prefill takes 2 steps (64-token budget), then 36 decode steps.
            steps = [ev for ev in h.events if isinstance(ev, StepTiming)]
            assert len(steps) == 38
            assert [s.tokens for s in steps[:3]] == [64, 36 + 0, 1]
            for s in steps:
                assert s.duration_s == pytest.approx(
                    simple_profile.step_time_s(s.tokens, s.context_tokens_read))
            assert steps[2].context_tokens_read == 100  # first decode reads the prompt
            assert 0 < end.ttft_s < end.duration_s
            assert end.duration_s >= sum(s.duration_s for s in steps) * 0.999
            assert h.b.view().running_seqs == 0

    run(main())


def test_a_preserved_job_resumes_by_prefilling_only_its_new_tokens(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            await h.admit("p", new=100, max_tokens=10)
            await h.finished("p")
            await h.b.apply(Pause("p", 0, KvAction.PRESERVE))
            await h.admit("p", new=20, context=110, max_tokens=5)
            end = await h.finished("p")
            assert (end.prefill_tokens, end.generated_tokens) == (20, 5)
            # Each segment's tokens are indexed from 0.
            assert h.tokens("p") == expected("p", 0, 10) + expected("p", 0, 5)

            # The same resume after a discard recomputes what the prefix cache lost.
            await h.admit("d", new=100, max_tokens=10)
            await h.finished("d")
            await h.b.apply(Pause("d", 0, KvAction.DISCARD))
            await h.admit("d", new=20, context=110, max_tokens=5)
            end = await h.finished("d")
            assert end.prefill_tokens == 130 - (109 // BS) * BS

    run(main())


def test_swap_out_and_in_each_take_the_profiles_swap_time(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            host_total = h.b.view().host_free_blocks
            await h.admit("s", new=100, max_tokens=10)
            await h.finished("s")
            swap_s = simple_profile.swap_time_s(110)  # 1 ms per token: 0.11 s
            t0 = h.b.now()
            await h.b.apply(Pause("s", 0, KvAction.SWAP))
            view = h.b.view()
            assert view.swapping_out_blocks == blocks(109)
            assert view.host_free_blocks == host_total - blocks(109)
            await h.until(lambda ev: isinstance(ev, MemoryChanged)  # not one from before
                          and ev.view.swapping_out_blocks == 0
                          and ev.view.host_free_blocks < host_total)
            assert h.b.now() - t0 >= swap_s
            assert h.b.view().free_blocks == 100  # the GPU copy is gone

            await h.admit("s", new=10, context=110, max_tokens=3, swap_in=True)
            end = await h.finished("s")
            assert end.ttft_s >= swap_s  # no step ran before the copy landed
            assert end.prefill_tokens == 10
            await h.idle()
            assert h.b.view().host_free_blocks == host_total

    run(main())


def test_two_concurrent_segments_both_finish_with_their_own_tokens(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            await h.admit("x", new=30, max_tokens=20)
            await h.admit("y", new=50, max_tokens=12)
            ends = {}
            while len(ends) < 2:
                ev = await h.until(lambda ev: isinstance(ev, SegmentEnded))
                ends[ev.job_id] = ev
            assert h.tokens("x") == expected("x", 0, 20)
            assert h.tokens("y") == expected("y", 0, 12)
            assert ends["x"].generated_tokens == 20 and ends["y"].generated_tokens == 12
            # Both were batched: a step processed their 80 prompt tokens' first 64 together.
            steps = [ev.tokens for ev in h.events if isinstance(ev, StepTiming)]
            assert steps[0] == 64 and max(steps[2:]) >= 2

    run(main())


def test_preempt_returns_the_kv_action_and_tokens_generated_and_the_segment_resumes(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            await h.admit("r", new=16, max_tokens=200)
            await h.until(lambda ev: len(h.tokens("r")) >= 5)
            got = await h.b.apply(Preempt("r", 0, KvAction.SWAP))
            assert got.action is KvAction.SWAP and 5 <= got.generated_tokens < 200
            assert await h.until(lambda ev: isinstance(ev, SegmentPreempted)) == got
            n = got.generated_tokens
            assert h.tokens("r") == expected("r", 0, n)  # streamed up to the preemption
            # Resume from host memory: the rest of the segment, indexed on from n.
            await h.admit("r", new=0, context=16 + n, max_tokens=200 - n, swap_in=True,
                          first_index=n)
            end = await h.finished("r")
            assert end.generated_tokens == 200 - n
            assert h.tokens("r") == expected("r", 0, 200)

            # A segment still prefilling cannot be swapped: it is dropped instead.
            await h.admit("q", new=640, max_tokens=5)
            await h.until(lambda ev: isinstance(ev, StepTiming))
            got = await h.b.apply(Preempt("q", 0, KvAction.SWAP))
            assert (got.action, got.generated_tokens) == (KvAction.DISCARD, 0)
            assert h.tokens("q") == []

    run(main())


def test_the_engine_preempts_the_latest_segment_when_decoding_runs_out_of_blocks(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=10) as h:
            await h.admit("first", new=60, max_tokens=90)
            await h.admit("second", new=60, max_tokens=90)
            pre = await h.until(lambda ev: isinstance(ev, SegmentPreempted))
            assert (pre.job_id, pre.action) == ("second", KvAction.DISCARD)
            assert h.tokens("second") == expected("second", 0, pre.generated_tokens)
            await h.finished("first")
            assert h.tokens("first") == expected("first", 0, 90)

    run(main())


def test_abort_frees_everything_the_job_holds_in_any_state(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            host_total = h.b.view().host_free_blocks
            for job in ("held", "swapped"):
                await h.admit(job, new=100, max_tokens=4)
                await h.finished(job)
            await h.b.apply(Pause("swapped", 0, KvAction.SWAP))  # copy still in flight
            await h.admit("running", new=40, max_tokens=500)
            await h.until(lambda ev: len(h.tokens("running")) >= 3)
            for job in ("held", "swapped", "running", "never-seen"):
                assert await h.b.apply(Abort(job, 0, "cancelled")) is None
            await h.idle()
            view = h.b.view()
            assert (view.free_blocks, view.running_seqs) == (100, 0)
            assert view.host_free_blocks == host_total
            assert not [ev for ev in h.events if isinstance(ev, SegmentPreempted)]
            # A job aborted mid-swap-in also comes back clean.
            await h.admit("again", new=100, max_tokens=2)
            await h.finished("again")
            await h.b.apply(Evict("again", 0, KvAction.SWAP))
            await h.idle()
            await h.admit("again", new=0, context=102, max_tokens=2, swap_in=True)
            await h.b.apply(Abort("again", 0))
            await h.idle()
            assert h.b.view().free_blocks == 100
            assert h.b.view().host_free_blocks == host_total

    run(main())


def test_release_frees_a_jobs_kv_quietly_and_ignores_unknown_jobs(simple_profile):
    """What the worker calls after the engine refused a job's Admit: the job's GPU blocks and
    host copy are freed, nothing is reported for the job, and an unknown job is a no-op."""
    async def main():
        async with Harness(simple_profile, kv_blocks=100) as h:
            host_total = h.b.view().host_free_blocks
            for job in ("held", "swapped"):
                await h.admit(job, new=100, max_tokens=4)
                await h.finished(job)
            await h.b.apply(Pause("swapped", 0, KvAction.SWAP))
            await h.idle()
            assert h.b.view().free_blocks < 100 and h.b.view().host_free_blocks < host_total
            for job in ("held", "swapped", "never-seen"):
                await h.b.release(job)
            await h.idle()
            view = h.b.view()
            assert (view.free_blocks, view.host_free_blocks) == (100, host_total)
            assert not [ev for ev in h.events if isinstance(ev, SegmentPreempted)]
            # A released job can be admitted again from scratch (recomputed).
            await h.admit("held", new=10, context=104, max_tokens=2)
            await h.finished("held")

    run(main())


def _state(b: SimulatedBackend):
    e = b.engine
    return (dict(e.held), dict(e.swapped), list(e.running), e.pool.free, e.pool.cached_total,
            e.host_used, len(e.transfers))


def test_bad_actions_raise_and_change_nothing(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=20) as h:
            b = h.b
            await h.admit("a", new=100, max_tokens=3)
            await h.finished("a")  # "a" holds 7 blocks, paused
            await h.admit("busy", new=32, max_tokens=1000)
            await h.until(lambda ev: len(h.tokens("busy")) >= 1)
            bad = [
                (Admit("busy", 0, 10, 0), SegmentInput(5)),  # already running
                (Admit("a", 0, 10, 999), SegmentInput(5)),  # wrong context for its KV
                (Admit("a", 0, 10, 103, swap_in=True), None),  # no SegmentInput
                (Admit("b", 0, 10, 0), SegmentInput(0)),  # max_tokens < 1
                (Admit("b", 0, 400, 0), SegmentInput(5)),  # 25 blocks: no room
                (Admit("b", 0, 10, 50, swap_in=True), SegmentInput(5)),  # nothing swapped
                (Evict("nobody", 0, KvAction.DISCARD), None),
                (Evict("a", 0, KvAction.PRESERVE), None),
                (Pause("busy", 0, KvAction.SWAP), None),  # its segment has not ended
                (Pause("nobody", 0, KvAction.PRESERVE), None),
                (Preempt("a", 0, KvAction.DISCARD), None),  # not running
                (Preempt("busy", 0, KvAction.PRESERVE), None),
                ("not an action", None),
            ]
            for action, seg in bad:
                # The step loop may advance the engine between awaits; nothing else may.
                before = _state(b)
                with pytest.raises(BackendError) as err:
                    await b.apply(action, seg)
                assert _state(b) == before, action
                assert str(err.value)
            # The engine is still usable: the paused job resumes, a new one runs.
            await b.apply(Preempt("busy", 0, KvAction.DISCARD))
            await h.admit("a", new=10, context=103, max_tokens=4)
            await h.admit("b", new=10, max_tokens=4)
            await h.finished("a")
            await h.finished("b")
            assert h.tokens("b") == expected("b", 0, 4)

    run(main())


def test_swap_needs_host_room(simple_profile):
    async def main():
        async with Harness(simple_profile, kv_blocks=20) as h:
            h.b.engine.host_total = 3  # fewer host blocks than the job holds
            await h.admit("a", new=100, max_tokens=3)
            await h.finished("a")
            before = _state(h.b)
            with pytest.raises(BackendError, match="host swap space full"):
                await h.b.apply(Pause("a", 0, KvAction.SWAP))
            assert _state(h.b) == before
            await h.b.apply(Pause("a", 0, KvAction.DISCARD))
            assert h.b.view().free_blocks == 20

    run(main())


# --- failure and lifecycle ------------------------------------------------------------------


def test_an_engine_failure_surfaces_as_backend_failed(simple_profile):
    async def main():
        b = SimulatedBackend(simple_profile, kv_blocks=100, time_scale=SCALE)
        with pytest.raises(BackendError, match="not running"):
            await b.apply(Abort("x", 0))
        await b.start()

        def broken(now):
            raise RuntimeError("GPU fell off the bus")

        b.engine.start_step = broken
        await b.apply(Admit("a", 0, 10, 0), SegmentInput(5))
        seen = []
        with pytest.raises(BackendFailed, match="GPU fell off the bus"):
            async for ev in b.events():
                seen.append(ev)
        assert seen and all(isinstance(ev, MemoryChanged) for ev in seen)
        with pytest.raises(BackendFailed):
            await b.apply(Admit("b", 0, 10, 0), SegmentInput(5))
        await b.stop()

    run(main())


def test_an_unexpected_error_in_an_action_fails_the_backend(simple_profile):
    async def main():
        b = SimulatedBackend(simple_profile, kv_blocks=100, time_scale=SCALE)
        await b.start()

        def broken(*args):
            raise AssertionError("block pool released more than it holds")

        b.engine.release = broken
        with pytest.raises(BackendFailed, match="released more"):
            await b.apply(Abort("a", 0))
        with pytest.raises(BackendFailed):
            async for _ in b.events():
                pass
        await b.stop()

    run(main())


def test_stop_ends_the_event_stream(simple_profile):
    async def main():
        b = SimulatedBackend(simple_profile, kv_blocks=100, time_scale=SCALE)
        await b.start()
        await b.apply(Admit("a", 0, 10, 0), SegmentInput(1000))
        await b.stop()
        await b.stop()
        events = [ev async for ev in b.events()]
        assert any(isinstance(ev, MemoryChanged) for ev in events)
        with pytest.raises(BackendError, match="not running"):
            await b.apply(Abort("a", 0))

    run(main())


def test_a_host_stall_delays_reports_but_not_the_engines_timeline(simple_profile):
    """The event loop wakes up long after a step was due (this process was busy sending):
    the steps still follow one another as their durations say, so the segment takes the
    engine time its steps cost, not the stall; the stall is recorded as lag."""
    async def main():
        clock = [0.0]
        b = SimulatedBackend(simple_profile, kv_blocks=100, time_scale=1.0,
                             clock=lambda: clock[0])
        await b.start()
        events = b.events().__aiter__()
        await b.apply(Admit("a", 0, 100, 0), SegmentInput(max_tokens=20, first_index=0))
        while not b.engine.busy:  # the first step starts at engine time 0
            await asyncio.sleep(0)
        clock[0] = 500.0  # the loop runs again only 500 engine seconds later
        b._wake()
        seen = []
        while not seen or not isinstance(seen[-1], SegmentEnded):
            seen.append(await asyncio.wait_for(events.__anext__(), 2.0))
        steps = [ev for ev in seen if isinstance(ev, StepTiming)]
        end = seen[-1]
        assert end.generated_tokens == 20
        assert end.duration_s == pytest.approx(sum(s.duration_s for s in steps))
        assert end.duration_s < 5.0
        assert b.max_lag_s > 400.0
        await b.stop()

    run(main())
