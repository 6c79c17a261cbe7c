"""The reservations ledger (control_plane/service/reservations.py): what plans changed on a
worker's view stays reserved until a memory report covers the plan that made the change."""

from __future__ import annotations

import dataclasses

import pytest

from astraea.plan import WorkerView
from control_plane.service.reservations import Reservation, Reservations, ViewCounters


def view(free: int = 100, running: int = 0, ctx: int = 0, host: int = 50,
         swapping: int = 0) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=100, free_blocks=free, block_size=16,
                      host_free_blocks=host, running_seqs=running, max_seqs=8,
                      running_context_tokens=ctx, step_time_s=0.01, step_index=0,
                      swapping_out_blocks=swapping)


def counters(v: WorkerView) -> tuple[int, ...]:
    return dataclasses.astuple(ViewCounters.of(v))


def admit(blocks: int, ctx: int = 0) -> Reservation:
    return Reservation(free_blocks=-blocks, running_seqs=1, running_context_tokens=ctx)


def test_a_reservation_is_what_the_plan_changed_on_every_counter():
    v = view(free=80, running=2, ctx=300, host=40, swapping=3)
    before = ViewCounters.of(v)
    # What build_plan does in place: admit one job, swap another out.
    v.free_blocks -= 10
    v.running_seqs += 1
    v.running_context_tokens += 160
    v.host_free_blocks -= 5
    v.swapping_out_blocks += 5
    assert Reservation.since(before, v) == Reservation(-10, 1, 160, -5, 5)
    # Counters a plan does not change are not counters the ledger carries.
    v.step_index += 1
    v.step_time_s = 1.0
    assert Reservation.since(before, v) == Reservation(-10, 1, 160, -5, 5)
    assert Reservation.since(ViewCounters.of(v), v).is_empty


def test_an_empty_change_is_not_recorded():
    ledger = Reservations()
    ledger.reserve(1, Reservation())
    assert len(ledger) == 0 and ledger.unsettled() == []
    ledger.reserve(2, admit(5))
    assert ledger.unsettled() == [(2, admit(5))]


def test_settling_is_by_sequence_number_and_keeps_later_plans():
    ledger = Reservations()
    for seq in (1, 2, 4):  # plan 3 changed nothing: no entry
        ledger.reserve(seq, admit(seq))
    ledger.settle(0)
    assert [s for s, _ in ledger.unsettled()] == [1, 2, 4]
    ledger.settle(2)  # a report taken after plan 2 shows plans 1 and 2
    assert [s for s, _ in ledger.unsettled()] == [4]
    ledger.settle(3)  # plan 3 reserved nothing: plan 4 stays
    assert [s for s, _ in ledger.unsettled()] == [4]
    ledger.settle(2)  # an older report settles nothing more and brings nothing back
    assert [s for s, _ in ledger.unsettled()] == [4]
    ledger.settle(10)
    assert len(ledger) == 0


def test_overlay_adds_the_unsettled_plans_onto_a_fresh_report():
    ledger = Reservations()
    ledger.reserve(1, admit(10, ctx=100))
    ledger.reserve(2, admit(20, ctx=200))
    ledger.settle(1)
    report = view(free=70, running=1, ctx=100)
    ledger.overlay(report)
    assert counters(report) == (50, 2, 300, 50, 0)


def test_a_report_that_covers_everything_is_the_view_as_reported():
    ledger = Reservations()
    ledger.reserve(1, admit(10))
    ledger.reserve(2, Reservation(free_blocks=8, host_free_blocks=-8, swapping_out_blocks=8))
    ledger.settle(2)
    report = view(free=77, running=3, ctx=999, host=11, swapping=2)
    ledger.overlay(report)
    assert counters(report) == (77, 3, 999, 11, 2)


def test_each_plan_is_clamped_at_zero_in_send_order():
    # The report shows 12 free blocks; plan 1 took 30 (more than the report has: clamped to
    # 0), plan 2 then freed 10. Clamped after each plan that is 10; clamping once on the sum
    # (12 - 30 + 10) would say 0.
    ledger = Reservations()
    ledger.reserve(1, Reservation(free_blocks=-30))
    ledger.reserve(2, Reservation(free_blocks=10))
    report = view(free=12)
    ledger.overlay(report)
    assert report.free_blocks == 10
    # The order matters: freeing first, then taking, gives 12 + 10 - 30 → clamped to 0.
    ledger = Reservations()
    ledger.reserve(1, Reservation(free_blocks=10))
    ledger.reserve(2, Reservation(free_blocks=-30))
    report = view(free=12)
    ledger.overlay(report)
    assert report.free_blocks == 0


def test_the_clamp_touches_only_the_counters_a_plan_changed():
    report = view(free=5, running=0, ctx=0, host=0)
    Reservation(free_blocks=-8, running_seqs=-1).add_to(report)
    assert counters(report) == (0, 0, 0, 0, 0)
    report = view(free=5, running=2, ctx=40, host=3, swapping=1)
    Reservation(running_context_tokens=-100, swapping_out_blocks=-1).add_to(report)
    assert counters(report) == (5, 2, 0, 3, 0)


def test_overlay_leaves_the_ledger_as_it_was():
    # Each report gets the unsettled plans again: overlaying does not settle anything.
    ledger = Reservations()
    ledger.reserve(3, admit(4))
    first, second = view(free=50), view(free=40)
    ledger.overlay(first)
    ledger.overlay(second)
    assert (first.free_blocks, second.free_blocks) == (46, 36)
    assert ledger.unsettled() == [(3, admit(4))]


def test_a_reservation_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        admit(3).free_blocks = 0  # type: ignore[misc]
