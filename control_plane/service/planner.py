"""The planner: one task that asks the core for a plan whenever something changed.

Plans are made on events only (a job arrived or returned from its tool, a segment ended or was
preempted, a worker's memory changed, a worker came or went) or when the core's own timer
(`Scheduler.next_timer`, e.g. a TTL) falls due — never per engine step. Events only mark the
planner dirty; several events before it runs give one plan. A plan the core proves empty
(`Scheduler.may_act`: no job waits, no KV policy revisits, no control loop is due) is not
built: most workers' reports change memory only, and each such plan cost a build, the views
and its span (bench-service: 0.4 ms of CPU per segment, a tenth of the control plane's).

A busy event loop reaches the planner task only after every callback queued before it (token
streams, reports, calls): under load that wait, not the plan, made the latency. So the
handlers also call `plan_if_overdue` where they leave the state consistent (after a worker
message, a submitted segment, a tool report): once the planner has been dirty for
`OVERDUE_S`, the plan is made there and then.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from astraea import wire
from astraea.plan import Admit
from astraea.telemetry import build_batch_span, get_logger, record_plan
from astraea.v1 import worker_pb2
from control_plane.service.context import ControlPlane
from control_plane.service.registry import WorkerEntry
from control_plane.service.reservations import Reservation, ViewCounters

log = get_logger("astraea.control_plane.planner")

OVERDUE_S = 0.002  # dirty this long: plan at the next consistent point, not at the loop's turn


class Planner:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._dirty = asyncio.Event()
        self.plans = 0  # planning rounds, those the core proves empty included (tests, logs)
        self._dirty_since: float | None = None  # perf_counter of the first event since a plan
        self.last_build_s: float | None = None  # build_plan wall time of the last plan_once
        self.last_actions = 0
        self._planning = False  # inside plan_once: an event it causes waits for the next plan

    def mark_dirty(self) -> None:
        """Plan soon (the control plane's on_change callback: the server wires it)."""
        if self._dirty_since is None:
            self._dirty_since = time.perf_counter()
        self._dirty.set()

    async def run(self) -> None:
        while True:
            timer = self.cp.scheduler.next_timer()
            timeout = None
            if timer is not None:
                timeout = max(0.0, (timer - self.cp.now()) * self.cp.config.time_scale)
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout)
                event = True
            except TimeoutError:
                event = False
            await asyncio.sleep(0)  # let the reports of this instant land before planning
            if event and not self._dirty.is_set():
                continue  # plan_if_overdue has made that plan meanwhile
            self._plan()

    def plan_if_overdue(self) -> None:
        """Plan now if an event has waited `OVERDUE_S` for a plan (call it only where the
        control plane's state is consistent: between two handlers' changes, not inside one)."""
        since = self._dirty_since
        if since is not None and not self._planning and time.perf_counter() - since > OVERDUE_S:
            self._plan()

    def _plan(self) -> None:
        self._dirty.clear()
        since, self._dirty_since = self._dirty_since, None
        started = time.monotonic()
        self._planning = True
        self.plans += 1
        try:
            self.plan_once()
        except Exception:  # a bug in one plan must not stop planning for good
            log.exception("build_plan failed")
        finally:
            self._planning = False
        if since is not None and self.last_build_s is not None:  # caused by an event
            self.cp.stats.record_plan(time.perf_counter() - since, self.last_build_s,
                                      self.last_actions)
        took = time.monotonic() - started
        if took > 0.05:
            log.warning("slow plan", seconds=round(took, 4))

    def plan_once(self) -> None:
        """Build a plan and queue each worker's part on its stream (synchronous: atomic)."""
        cp = self.cp
        self.last_build_s = None
        for entry in cp.registry.draining():  # KV left behind by segments that ended there
            cp.drop_kept_kv(entry.worker_id)
        if not cp.scheduler.may_act(cp.now()):
            return  # certainly empty (see the module docstring); the simulator skips it too
        views = cp.registry.views()  # without the draining workers: nothing new goes there
        if not views:
            return
        before = {w: ViewCounters.of(v) for w, v in views.items()}
        with build_batch_span(cp.tracing.tracer, cp.scheduler.queue_lengths()) as span:
            t0 = time.perf_counter()
            actions = cp.scheduler.build_plan(cp.now(), views)
            self.last_build_s, self.last_actions = time.perf_counter() - t0, len(actions)
            record_plan(span, actions)
        cp.metrics.record_decision_latency(1000 * self.last_build_s, kind="build_plan")
        per_worker: dict[int, list[worker_pb2.PlanAction]] = defaultdict(list)
        for action in actions:
            msg = wire.plan_action_to_proto(action)
            if isinstance(action, Admit):
                stale = self._fill_admit(action, msg.admit)
                if stale is not None and stale in views:
                    # The job's history moved away from `stale`: free its copy there.
                    per_worker[stale].append(wire.plan_action_to_proto(wire.Abort(
                        action.job_id, stale, f"history moved to worker {action.worker_id}")))
            per_worker[action.worker_id].append(msg)
        for worker_id, msgs in per_worker.items():
            cp.send(worker_id, msgs, Reservation.since(before[worker_id], views[worker_id]))

    def _fill_admit(self, action: Admit, admit: worker_pb2.Admit) -> int | None:
        """The segment's input, which the core's Admit does not carry: what is left of the
        token budget, the sampling, the prompt (on the first admission only: after a
        preemption the worker or the recomputation already has it), and the job's history
        when the worker does not hold it. Returns the worker that held the history until now
        if it should free it (that worker keeps histories: it registered needs_history),
        else None."""
        cp = self.cp
        entry = cp.registry.jobs[action.job_id]
        seg = entry.segment
        admit.trace_context.update(
            cp.tracing.segment_admitted(entry.job, action.worker_id, action.swap_in))
        admit.max_tokens = seg.max_tokens - seg.generated
        admit.sampling.CopyFrom(seg.sampling)
        # The worker derives the admission's first token index from
        # sampling.max_tokens - max_tokens (the Admit message has no first_index field).
        seg.admission_base = seg.generated
        if seg.next_index != seg.generated:
            log.warning("streamed and reported token counts differ", job_id=action.job_id,
                        streamed=seg.next_index, reported=seg.generated)
        old = entry.history_worker
        moved = old != action.worker_id
        # Only an engine that declared it (Register.needs_history) is sent the history.
        entry.context_in_admit = moved and bool(entry.transcript) and _needs_history(
            cp.registry.workers.get(action.worker_id))
        if entry.context_in_admit:
            _add_context(admit.context, entry.transcript)
        seg.prompt_in_admit = False
        if not seg.admitted:
            seg.admitted = seg.prompt_in_admit = True
            seg.admitted_s = cp.now()
            which = seg.request.WhichOneof("input")
            if which == "prompt_text":
                admit.prompt_text = seg.request.prompt_text
                entry.transcript.append(seg.request.prompt_text)
                entry.output = None
            elif which == "prompt_token_ids":
                admit.prompt_token_ids.CopyFrom(seg.request.prompt_token_ids)
                entry.transcript.append(tuple(seg.request.prompt_token_ids.ids))
                entry.output = None
        entry.history_worker = action.worker_id
        if moved and old is not None and _needs_history(cp.registry.workers.get(old)):
            return old
        return None


def _needs_history(worker: WorkerEntry | None) -> bool:
    """Whether `worker` (None if gone) keeps a job's token history, so must be sent it and
    told to free it (it registered with `needs_history`)."""
    return worker is not None and worker.info.needs_history


def _add_context(context, transcript) -> None:
    for piece in transcript:
        if isinstance(piece, str):
            context.add(text=piece)
        else:
            context.add().token_ids.ids.extend(piece)
