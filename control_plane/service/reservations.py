"""The memory a worker's plans have reserved that its latest MemoryReport does not show yet.

`build_plan` changes a worker's `WorkerView` in place as it admits, pauses, evicts or
preempts. The worker reports its memory after applying plan `applied_plan_seq`; that report
replaces the view, so the changes of the plans sent after it would vanish until the next
report, and the planner would hand the same blocks out twice. The ledger holds each plan's
change until a report covers the plan, and adds the unsettled ones back onto each fresh report.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from astraea.plan import WorkerView


@dataclass(frozen=True)
class ViewCounters:
    """The counters of a `WorkerView` that a plan changes, read at one moment (before a plan,
    so that `Reservation.since` can tell what the plan did)."""

    free_blocks: int
    running_seqs: int
    running_context_tokens: int
    host_free_blocks: int
    swapping_out_blocks: int

    @classmethod
    def of(cls, view: WorkerView) -> ViewCounters:
        return cls(view.free_blocks, view.running_seqs, view.running_context_tokens,
                   view.host_free_blocks, view.swapping_out_blocks)


@dataclass(frozen=True)
class Reservation:
    """What one plan did to a worker's view: each counter's change (after minus before).
    Admitting takes free blocks (negative `free_blocks`) and adds a running sequence; a
    swap-out Pause takes host blocks and adds blocks in flight; and so on."""

    free_blocks: int = 0
    running_seqs: int = 0
    running_context_tokens: int = 0
    host_free_blocks: int = 0
    swapping_out_blocks: int = 0

    @classmethod
    def since(cls, before: ViewCounters, view: WorkerView) -> Reservation:
        """What was planned on `view` since its counters were `before`."""
        return cls(view.free_blocks - before.free_blocks,
                   view.running_seqs - before.running_seqs,
                   view.running_context_tokens - before.running_context_tokens,
                   view.host_free_blocks - before.host_free_blocks,
                   view.swapping_out_blocks - before.swapping_out_blocks)

    @property
    def is_empty(self) -> bool:
        return not (self.free_blocks or self.running_seqs or self.running_context_tokens
                    or self.host_free_blocks or self.swapping_out_blocks)

    def add_to(self, view: WorkerView) -> None:
        """Add the change to `view`; a counter it changes is clamped at zero (a report may
        show less room than the plan assumed: the view must not promise negative memory)."""
        if self.free_blocks:
            view.free_blocks = max(0, view.free_blocks + self.free_blocks)
        if self.running_seqs:
            view.running_seqs = max(0, view.running_seqs + self.running_seqs)
        if self.running_context_tokens:
            view.running_context_tokens = max(
                0, view.running_context_tokens + self.running_context_tokens)
        if self.host_free_blocks:
            view.host_free_blocks = max(0, view.host_free_blocks + self.host_free_blocks)
        if self.swapping_out_blocks:
            view.swapping_out_blocks = max(
                0, view.swapping_out_blocks + self.swapping_out_blocks)


class Reservations:
    """One worker's ledger: the reservations of the plans sent to it, by plan sequence number,
    that no MemoryReport has covered yet."""

    def __init__(self) -> None:
        self._unsettled: deque[tuple[int, Reservation]] = deque()  # in send (= seq) order

    def reserve(self, seq: int, change: Reservation) -> None:
        """Plan `seq` (sent after every plan reserved before) made `change`; an empty change
        reserves nothing and is not recorded."""
        if not change.is_empty:
            self._unsettled.append((seq, change))

    def settle(self, applied_seq: int) -> None:
        """A report taken after plan `applied_seq` shows that plan and every earlier one."""
        while self._unsettled and self._unsettled[0][0] <= applied_seq:
            self._unsettled.popleft()

    def overlay(self, view: WorkerView) -> None:
        """Add the unsettled reservations to a fresh report's `view`, plan by plan in the
        order they were sent, each counter clamped at zero after each plan, not once on the
        sum: a later plan that frees memory counts in full even when an earlier one took more
        than the report shows (clamping the sum once was measured worse on the live demo)."""
        for _, change in self._unsettled:
            change.add_to(view)

    def unsettled(self) -> list[tuple[int, Reservation]]:
        """(seq, change) of each plan not covered by a report yet, in send order."""
        return list(self._unsettled)

    def __len__(self) -> int:
        return len(self._unsettled)
