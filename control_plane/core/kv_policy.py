"""What happens to a job's KV cache while it waits for an API.

InferCept's memory-waste terms (bytes × seconds) for a job with context C tokens, M bytes of KV
per token, predicted remaining API time T_int, the other running jobs' context C_other and the
whole batch's C_batch::

    waste_discard  = T_fwd(C)·C·M + T_fwd(C)·C_other·M     recompute, and the batch stalls meanwhile
    waste_preserve = T_int·C·M                              memory held idle
    waste_swap     = 2·T_swap(C)·C_batch·M                  out and in, when not hidden

Policies:
* `AlwaysDiscard`   — vLLM and Autellix: the call ends, its blocks go to the prefix cache.
* `MinWaste`        — InferCept: swap, in order of preserve waste, what the per-iteration swap
                      budget can hide; preserve or discard the rest by the smaller waste.
* `TimeToLive`      — Continuum: pin the KV for a TTL chosen from the tool's duration CDF.
* `PressureAdaptive`— Astraea: preserve while memory is plentiful (unless the copy out and
                      back is free: a small share of a step); as utilisation rises the
                      preserve waste is weighed in full; and when a ready job does not fit,
                      reclaim memory from the paused jobs whose KV wastes the most.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from astraea.plan import KvAction, KvDecision, WorkerView
from astraea.profile import HardwareProfile
from control_plane.core.config import ContinuumConfig, KvPolicyConfig
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.job import Job


@dataclass(frozen=True)
class Waste:
    preserve: float
    discard: float
    swap: float
    remaining_api_s: float
    context_tokens: int

    def as_inputs(self) -> dict:
        return {
            "waste_preserve": self.preserve,
            "waste_discard": self.discard,
            "waste_swap": self.swap,
            "remaining_api_s": self.remaining_api_s,
            "context_tokens": self.context_tokens,
        }


def memory_waste(profile: HardwareProfile, context: int, remaining_api_s: float,
                 other_context: int) -> Waste:
    m = profile.kv_bytes_per_token
    t_fwd = profile.prefill_time_s(context)
    batch = other_context + context
    return Waste(
        preserve=remaining_api_s * context * m,
        discard=t_fwd * context * m + t_fwd * other_context * m,
        swap=2 * profile.swap_time_s(context) * batch * m,
        remaining_api_s=remaining_api_s,
        context_tokens=context,
    )


class SwapBudget:
    """Tokens whose transfer hides behind one forward pass, renewed every engine step."""

    def __init__(self, profile: HardwareProfile) -> None:
        self._profile = profile
        self._step: dict[int, int] = {}
        self._left: dict[int, float] = {}

    def left(self, view: WorkerView) -> float:
        if self._step.get(view.worker_id) != view.step_index:
            self._step[view.worker_id] = view.step_index
            self._left[view.worker_id] = (
                view.step_time_s * self._profile.swap_bandwidth_bytes_per_s
                / self._profile.kv_bytes_per_token
            )
        return self._left[view.worker_id]

    def spend(self, view: WorkerView, tokens: int) -> None:
        self.left(view)
        self._left[view.worker_id] -= tokens

    def peek(self, view: WorkerView) -> float:
        """What `left(view)` would return, without renewing the budget."""
        if self._step.get(view.worker_id) == view.step_index:
            return self._left[view.worker_id]
        return view.step_time_s * self._profile.swap_bandwidth_bytes_per_s / self._profile.kv_bytes_per_token

    def longest_step_below(self, tokens: int) -> float:
        """The longest step whose renewed budget stays below `tokens` (-1 if none does)."""
        per_s = self._profile.swap_bandwidth_bytes_per_s
        per_token = self._profile.kv_bytes_per_token
        step = tokens * per_token / per_s
        while step > 0 and step * per_s / per_token >= tokens:
            step = math.nextafter(step, 0.0)  # the budget's own rounding decides
        return step if step > 0 else -1.0


class KvPolicy:
    """Base: decide at the API yield; optionally revisit paused jobs and reclaim memory."""

    name = "base"

    def __init__(self, profile: HardwareProfile, estimator: ServiceTimeEstimator) -> None:
        self.profile = profile
        self.estimator = estimator

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        raise NotImplementedError

    def revisit(self, now: float, paused: list[Job], view: WorkerView) -> list[KvDecision]:
        """Change decisions for preserved jobs (budgeted swaps, expired TTLs). Default: none."""
        return []

    def revisit_idle(self, now: float) -> bool:
        """True when `revisit` would certainly return nothing at `now`, whatever the paused
        jobs and the view (lets the simulator skip plans that cannot act). A policy that
        overrides `revisit` must override this too, or it is never idle."""
        return type(self).revisit is KvPolicy.revisit

    def revisit_quiet(self, now: float, until: float, paused: list[Job], view: WorkerView,
                      stepping: bool) -> tuple[float, float]:
        """For a caller that skips plans: `(T, S)` such that `revisit` certainly returns
        nothing at any instant in (now, T) while nothing happens but time passing and, if
        `stepping`, the worker's engine steps (each at most S seconds long, adding context to
        the batch and taking free blocks). T = now: it may act. Default: `revisit_idle`."""
        return (until, float("inf")) if self.revisit_idle(now) else (now, 0.0)

    def revisit_skipped(self, view: WorkerView) -> None:
        """A caller skipped revisits `revisit_quiet` proved empty, the last with `view`: keep
        the state they would have left behind. Default: none is kept."""

    def reclaim(self, now: float, paused: list[Job], view: WorkerView,
                blocks_needed: int) -> list[KvDecision]:
        """Evict paused jobs to make `blocks_needed` free for a ready job. Default: none."""
        return []

    def forget(self, job: Job) -> None:
        """The job left the paused set (returned, evicted or cancelled)."""

    def copy_is_free(self, tokens: int, view: WorkerView) -> bool:
        """Whether copying `tokens` of KV between GPU and host on the worker of `view` costs
        nobody any time (`kv.free_copy_step_share`). Default: no copy is free."""
        return False

    def next_deadline(self) -> float | None:
        """The earliest time this policy wants to revisit without another event."""
        return None

    # helpers
    def _waste(self, job: Job, now: float, view: WorkerView) -> Waste:
        remaining = self.estimator.remaining_api_s(job, now)
        other = max(view.running_context_tokens - job.context_tokens, 0)
        return memory_waste(self.profile, job.context_tokens, remaining, other)

    def _can_swap(self, job: Job, view: WorkerView) -> bool:
        return view.host_free_blocks >= view.blocks_for(job.kv_positions)

    def _swap_worth(self, job: Job, remaining_api_s: float, view: WorkerView) -> bool:
        """The call outlasts the copy's round trip and the host has room for the KV."""
        round_trip = 2 * self.profile.swap_time_s(job.context_tokens)
        return remaining_api_s > round_trip and self._can_swap(job, view)


class AlwaysDiscard(KvPolicy):
    name = "discard"

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        return KvDecision(job.job_id, KvAction.DISCARD, "each call is its own request")


class MinWaste(KvPolicy):
    """InferCept: minimise memory waste; swaps limited to the per-iteration swap budget.

    A job the budget cannot swap now stays preserved and is offered again at the next plan
    (InferCept re-evaluates paused requests every iteration) while swapping still beats both
    other choices.
    """

    name = "min-waste"

    def __init__(self, profile: HardwareProfile, estimator: ServiceTimeEstimator) -> None:
        super().__init__(profile, estimator)
        self.budget = SwapBudget(profile)
        self._swap_wanted: dict[str, Job] = {}

    def _decide(self, job: Job, now: float, view: WorkerView, reason_prefix: str) -> KvDecision:
        w = self._waste(job, now, view)
        inputs = w.as_inputs()
        # Inside the budget the transfer hides behind compute, so its waste is ~0 as long as
        # it is back before the API returns.
        swap_worth = self._swap_worth(job, w.remaining_api_s, view)
        if swap_worth and self.budget.left(view) >= job.context_tokens:
            self.budget.spend(view, job.context_tokens)
            self._swap_wanted.pop(job.job_id, None)
            return KvDecision(job.job_id, KvAction.SWAP, f"{reason_prefix}: swap hidden by budget", inputs)
        if w.discard < w.preserve:
            self._swap_wanted.pop(job.job_id, None)
            return KvDecision(job.job_id, KvAction.DISCARD, f"{reason_prefix}: discard < preserve", inputs)
        if swap_worth and w.swap < w.preserve:
            self._swap_wanted[job.job_id] = job  # retry when the next step renews the budget
        return KvDecision(job.job_id, KvAction.PRESERVE, f"{reason_prefix}: preserve <= discard", inputs)

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        return self._decide(job, now, view, "yield")

    def revisit(self, now: float, paused: list[Job], view: WorkerView) -> list[KvDecision]:
        if not self._swap_wanted or self.budget.left(view) <= 0:
            return []
        # Only jobs still preserved on this worker: one whose KV has left can't be evicted.
        held = {j.job_id for j in paused}
        mine = [j for j in self._swap_wanted.values() if j.job_id in held]
        # Highest preserve waste first: those gain most from leaving the GPU.
        mine.sort(key=lambda j: -self.estimator.remaining_api_s(j, now) * j.context_tokens)
        out = []
        for job in mine:
            d = self._decide(job, now, view, "revisit")
            if d.action is not KvAction.PRESERVE:
                out.append(d)
        return out

    def revisit_idle(self, now: float) -> bool:
        return not self._swap_wanted

    def revisit_quiet(self, now: float, until: float, paused: list[Job], view: WorkerView,
                      stepping: bool) -> tuple[float, float]:
        """A job the budget could not swap stays preserved (a revisit does nothing) while
        discarding wastes no less than preserving and no budget can hide its swap. The
        other jobs' context only grows and the predicted remaining wait is bounded over the
        stretch by the estimator, so each job's discard test at the most favourable instant
        decides; on a stepping worker each step renews the budget from its own duration, so
        steps are kept short enough that it stays below the smallest swappable context."""
        if not self._swap_wanted:
            return until, float("inf")
        bound = getattr(self.estimator, "remaining_api_until", None)
        if bound is None:
            return now, 0.0  # no bound on the remaining wait: any instant may act
        held = {j.job_id for j in paused}
        left = None if stepping else self.budget.peek(view)
        limit, smallest = until, None
        for job in self._swap_wanted.values():
            if job.job_id not in held:
                continue
            context = job.context_tokens
            other = max(view.running_context_tokens - context, 0)
            round_trip = 2 * self.profile.swap_time_s(context)
            can_swap = self._can_swap(job, view)
            if can_swap and stepping:
                smallest = context if smallest is None else min(smallest, context)
            swap_now = can_swap and not stepping and left >= context
            # `_decide`'s discard test, `discard < preserve`, with the preserve waste's own
            # arithmetic (the discard waste does not depend on the remaining wait).
            discard = memory_waste(self.profile, context, 0.0, other).discard
            m = self.profile.kv_bytes_per_token

            def acts(remaining: float, context=context, discard=discard, m=m,
                     round_trip=round_trip, swap_now=swap_now) -> bool:
                return (swap_now and remaining > round_trip) or discard < remaining * context * m

            limit = bound(job, now, limit, acts)
            if limit <= now:
                return now, 0.0
        if smallest is None:
            return limit, float("inf")
        longest = self.budget.longest_step_below(smallest)
        return (limit, longest) if longest >= 0 else (now, 0.0)

    def revisit_skipped(self, view: WorkerView) -> None:
        # A revisit renews the budget of the view's step first: a later plan in the same
        # step (while the engine runs it) reads that, not one renewed from the new step.
        if self._swap_wanted:
            self.budget.left(view)

    def forget(self, job: Job) -> None:
        self._swap_wanted.pop(job.job_id, None)


class TimeToLive(KvPolicy):
    """Continuum: pin the KV for τ* = argmax_τ P(T ≤ τ)·benefit − cost(τ), then drop it.

    benefit = the recompute the pin saves plus the queueing a returning job would pay;
    cost(τ)  = τ · (share of KV capacity held) · memory price (seconds of GPU time).
    P comes from the empirical CDF of the tool category's durations. Under memory pressure
    pinned jobs are unpinned, the furthest deadline first.
    """

    name = "ttl"

    def __init__(self, profile: HardwareProfile, estimator: ServiceTimeEstimator,
                 config: ContinuumConfig, queueing_delay_s: Callable[[], float]) -> None:
        super().__init__(profile, estimator)
        self.config = config
        self._queueing_delay_s = queueing_delay_s
        self._deadlines: list[tuple[float, str]] = []
        self._deadline_of: dict[str, float] = {}

    def ttl_for(self, job: Job) -> tuple[float, dict]:
        samples = self.estimator.api_duration_samples(job.next_tool_category or "")
        benefit = self.profile.prefill_time_s(job.context_tokens) + self._queueing_delay_s()
        share = job.context_tokens / (self.profile.kv_capacity_blocks * self.profile.block_size)
        price = share * self.config.memory_price_s
        if not samples:
            # Cold start: exponential durations with the estimator's prior mean.
            mean = max(self.estimator.api_duration_s(job), 1e-6)
            # d/dτ [(1 − e^{−τ/mean})·B − τ·price] = 0  →  τ = mean·ln(B / (mean·price))
            arg = benefit / (mean * price) if price > 0 else float("inf")
            tau = mean * math.log(arg) if arg > 1 else 0.0
        else:
            n = len(samples)
            best, tau = 0.0, 0.0
            for i, t in enumerate(samples):  # sorted: P(T ≤ t) = (i + 1) / n
                gain = (i + 1) / n * benefit - t * price
                if gain > best:
                    best, tau = gain, t
        tau = min(tau, self.config.max_ttl_s)
        return tau, {"ttl_s": tau, "benefit_s": benefit, "price_per_s": price,
                     "samples": len(samples)}

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        tau, inputs = self.ttl_for(job)
        if tau <= 0:
            return KvDecision(job.job_id, KvAction.DISCARD, "ttl 0: pinning never pays", inputs)
        deadline = now + tau
        self._deadline_of[job.job_id] = deadline
        heapq.heappush(self._deadlines, (deadline, job.job_id))
        return KvDecision(job.job_id, KvAction.PRESERVE, "pinned until ttl", inputs)

    def revisit(self, now: float, paused: list[Job], view: WorkerView) -> list[KvDecision]:
        out = []
        by_id = {j.job_id: j for j in paused}
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, job_id = heapq.heappop(self._deadlines)
            if self._deadline_of.get(job_id) != deadline or job_id not in by_id:
                continue  # stale entry, or the job is on another worker
            del self._deadline_of[job_id]
            out.append(KvDecision(job_id, KvAction.DISCARD, "ttl expired", {"deadline_s": deadline}))
        return out

    def reclaim(self, now: float, paused: list[Job], view: WorkerView,
                blocks_needed: int) -> list[KvDecision]:
        pinned = [j for j in paused if j.job_id in self._deadline_of]
        pinned.sort(key=lambda j: -self._deadline_of[j.job_id])
        out, freed = [], 0
        for job in pinned:
            if freed >= blocks_needed:
                break
            freed += view.blocks_for(job.kv_positions)
            self._deadline_of.pop(job.job_id, None)
            out.append(KvDecision(job.job_id, KvAction.DISCARD, "unpinned under memory pressure"))
        return out

    def revisit_idle(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is None or deadline > now

    def forget(self, job: Job) -> None:
        self._deadline_of.pop(job.job_id, None)

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadline_of.get(self._deadlines[0][1]) != self._deadlines[0][0]:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None


class PressureAdaptive(MinWaste):
    """Astraea: InferCept's waste rule, weighted by memory pressure, plus reclaim-on-demand."""

    name = "pressure-adaptive"

    def __init__(self, profile: HardwareProfile, estimator: ServiceTimeEstimator,
                 config: KvPolicyConfig) -> None:
        super().__init__(profile, estimator)
        self.config = config

    def copy_is_free(self, tokens: int, view: WorkerView) -> bool:
        # Only behind other jobs' steps: on an idle engine the job itself waits for its copy.
        share = self.config.free_copy_step_share
        return (share > 0 and view.running_seqs > 0
                and self.profile.swap_time_s(tokens) <= share * view.step_time_s)

    def pressure_weight(self, utilization: float) -> float:
        lo, hi = self.config.low_pressure, self.config.high_pressure
        return min(max((utilization - lo) / max(hi - lo, 1e-9), 0.0), 1.0)

    def on_api_yield(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        u = view.utilization
        weight = self.pressure_weight(u)
        if weight <= 0.0:
            return self._low_pressure(job, now, view)
        w = self._waste(job, now, view)
        inputs = {**w.as_inputs(), "utilization": u, "pressure_weight": weight}
        preserve = w.preserve * weight
        swap_worth = self._swap_worth(job, w.remaining_api_s, view)
        if swap_worth and self.budget.left(view) >= job.context_tokens and preserve > 0:
            self.budget.spend(view, job.context_tokens)
            return KvDecision(job.job_id, KvAction.SWAP, "pressure: swap hidden by budget", inputs)
        if w.discard < preserve:
            if swap_worth and self.config.swap_before_discard:
                return KvDecision(job.job_id, KvAction.SWAP,
                                  "pressure: swap rather than discard (host has room)", inputs)
            return KvDecision(job.job_id, KvAction.DISCARD, "pressure: discard < weighted preserve", inputs)
        return KvDecision(job.job_id, KvAction.PRESERVE, "pressure: weighted preserve <= discard", inputs)

    def _low_pressure(self, job: Job, now: float, view: WorkerView) -> KvDecision:
        """Free memory costs nobody anything, so the KV stays, unless its copy out and back
        is free too (the budget hides it, and swapping it in takes a small share of a step):
        then it leaves, and the memory is there for a ready job without a reclaim."""
        inputs = {"utilization": view.utilization}
        context = job.context_tokens
        if self.copy_is_free(context, view) and self.budget.left(view) >= context:
            remaining = self.estimator.remaining_api_s(job, now)
            if self._swap_worth(job, remaining, view):
                self.budget.spend(view, context)
                return KvDecision(job.job_id, KvAction.SWAP, "low memory pressure, free copy",
                                  {**inputs, "remaining_api_s": remaining})
        return KvDecision(job.job_id, KvAction.PRESERVE, "low memory pressure", inputs)

    def revisit(self, now: float, paused: list[Job], view: WorkerView) -> list[KvDecision]:
        return []

    def revisit_idle(self, now: float) -> bool:
        return True

    def reclaim(self, now: float, paused: list[Job], view: WorkerView,
                blocks_needed: int) -> list[KvDecision]:
        if not self.config.reclaim_for_ready_jobs:
            return []
        scored = []
        for job in paused:
            remaining = self.estimator.remaining_api_s(job, now)
            recompute = self.profile.prefill_time_s(job.context_tokens)
            round_trip = 2 * self.profile.swap_time_s(job.context_tokens)
            if remaining <= min(recompute, round_trip):
                continue  # back before eviction could pay off
            scored.append((remaining * job.context_tokens, remaining, round_trip, job))
        scored.sort(key=lambda s: -s[0])
        out, freed, host_left = [], 0, view.host_free_blocks
        for waste, remaining, round_trip, job in scored:
            if freed >= blocks_needed:
                break
            blocks = view.blocks_for(job.kv_positions)
            if not self.config.reclaim_discards and (remaining <= round_trip or host_left < blocks):
                continue
            freed += blocks
            inputs = {"remaining_api_s": remaining, "waste_preserve_token_s": waste,
                      "blocks_needed": blocks_needed}
            if remaining > round_trip and host_left >= blocks:
                host_left -= blocks
                out.append(KvDecision(job.job_id, KvAction.SWAP, "reclaim for a ready job", inputs))
            else:
                out.append(KvDecision(job.job_id, KvAction.DISCARD, "reclaim for a ready job", inputs))
        return out
