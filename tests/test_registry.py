"""The control plane's view of a worker between its memory reports (registry.WorkerEntry):
what plans reserved stays reserved until a report says the worker applied them."""

from __future__ import annotations

from astraea.plan import WorkerInfo, WorkerView
from control_plane.service.registry import WorkerEntry
from control_plane.service.reservations import Reservation, ViewCounters


def view(free: int, running: int = 0, ctx: int = 0, host: int = 50) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=100, free_blocks=free, block_size=16,
                      host_free_blocks=host, running_seqs=running, max_seqs=8,
                      running_context_tokens=ctx, step_time_s=0.01, step_index=0)


def entry() -> WorkerEntry:
    info = WorkerInfo("m", "sim", False, 100, 16, 50, 8, 512, "p")
    return WorkerEntry(0, "w", info, view(100))


def plan(e: WorkerEntry, blocks: int, seqs: int = 1) -> int:
    """A plan admitting `seqs` jobs of `blocks` blocks in all, as build_plan changes the view."""
    before = ViewCounters.of(e.view)
    e.view.free_blocks -= blocks
    e.view.running_seqs += seqs
    e.next_plan([], Reservation.since(before, e.view))
    return e.plan_seq


def test_a_report_keeps_the_reservations_of_plans_it_does_not_cover():
    e = entry()
    first, second, third = plan(e, 10), plan(e, 20), plan(e, 5)
    assert (e.view.free_blocks, e.view.running_seqs) == (65, 3)
    # Taken after the first plan only: the other two are added back to its figures.
    e.memory_reported(view(90, running=1), first)
    assert (e.view.free_blocks, e.view.running_seqs) == (65, 3)
    e.memory_reported(view(70, running=2), second)
    assert (e.view.free_blocks, e.view.running_seqs) == (65, 3)
    e.memory_reported(view(64, running=3), third)  # everything applied: the worker's word
    assert (e.view.free_blocks, e.view.running_seqs) == (64, 3)
    assert len(e.reservations) == 0
    e.memory_reported(view(80, running=2), third)
    assert (e.view.free_blocks, e.view.running_seqs) == (80, 2)


def test_reservations_never_take_a_counter_below_zero():
    e = entry()
    plan(e, 30)
    e.memory_reported(view(12), 0)  # the worker found less room than the plan assumed
    assert e.view.free_blocks == 0
    e.memory_reported(view(50, running=1), e.plan_seq)
    assert e.view.free_blocks == 50


def test_a_plan_that_changed_nothing_is_not_held():
    e = entry()
    e.next_plan([], Reservation())
    e.next_plan([])
    assert len(e.reservations) == 0
    e.memory_reported(view(100), 0)
    assert e.view.free_blocks == 100
