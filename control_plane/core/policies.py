"""Scheduling policies by name: a discipline plus a KV policy, each documented with its source.

| name            | discipline                           | KV during API waits                 |
|-----------------|--------------------------------------|-------------------------------------|
| vllm-fcfs       | FCFS per segment, blocking           | discard (prefix cache may still hit)|
| infercept       | FCFS by job arrival, blocking        | min waste, swap budget              |
| autellix-plas   | program-level least attained service | discard (prefix cache may still hit)|
| continuum       | FCFS by job arrival, blocking        | pin for a TTL from the tool's CDF   |
| astraea         | Stateful-MLFQ + HRRN + aging         | pressure-adaptive                   |
| astraea-paper   | Stateful-MLFQ, first non-empty level | pressure-adaptive                   |
| thunderagent    | ACTIVE programs FCFS; pause/resume   | kept while ACTIVE; paused: host/drop|
|                 | whole programs every 5 s             |                                     |
| mars            | AIMD agent admission; continuations  | kept if warm resumption pays, else  |
|                 | first, feedback levels by service    | host or drop                        |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from astraea.profile import HardwareProfile
from control_plane.core.config import SchedulerConfig
from control_plane.core.discipline import Fcfs, Plas
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.kv_policy import (
    AlwaysDiscard,
    MinWaste,
    PressureAdaptive,
    TimeToLive,
)
from control_plane.core.mars import AgentAdmission, WarmResumption
from control_plane.core.mlfq import StatefulMlfq
from control_plane.core.scheduler import Scheduler
from control_plane.core.thunderagent import ProgramPauseResume, ThunderAgentKv


@dataclass(frozen=True)
class PolicySpec:
    name: str
    summary: str
    source: str
    build: Callable[[HardwareProfile, ServiceTimeEstimator, SchedulerConfig], Scheduler]


def _vllm(profile, estimator, config):
    return Scheduler(Fcfs("segment"), AlwaysDiscard(profile, estimator), profile, estimator, config)


def _infercept(profile, estimator, config):
    return Scheduler(Fcfs("job"), MinWaste(profile, estimator), profile, estimator, config)


def _plas(profile, estimator, config):
    return Scheduler(Plas(config.plas), AlwaysDiscard(profile, estimator), profile, estimator, config)


def _continuum(profile, estimator, config):
    # The TTL's benefit includes the queueing a returning job would pay: the scheduler's
    # recent queueing delay, read when each TTL is chosen.
    holder: list[Scheduler] = []
    ttl = TimeToLive(profile, estimator, config.continuum,
                     lambda: holder[0].recent_queueing_delay_s if holder else 0.0)
    holder.append(Scheduler(Fcfs("job"), ttl, profile, estimator, config))
    return holder[0]


def _running_cap(config: SchedulerConfig, profile: HardwareProfile) -> SchedulerConfig:
    """Stateful-MLFQ's cap on running segments (`mlfq.running_budget_share` of the step
    token budget), applied through the scheduler's per-worker cap; the smaller cap wins."""
    share = config.mlfq.running_budget_share
    if share <= 0:
        return config
    cap = max(1, int(share * profile.max_num_batched_tokens))
    if config.max_running_per_worker:
        cap = min(cap, config.max_running_per_worker)
    return replace(config, max_running_per_worker=cap)


def _astraea(profile, estimator, config):
    config = _running_cap(config, profile)
    return Scheduler(StatefulMlfq(config.mlfq), PressureAdaptive(profile, estimator, config.kv),
                      profile, estimator, config)


def _astraea_paper(profile, estimator, config):
    # The paper's behaviour, stated explicitly so that no default of `astraea` leaks in.
    mlfq = replace(config.mlfq, work_conserving=False, prioritize_prefill=False,
                   prefill_aging_ratio=0.0, reserve_ratio=0.0, age_weight=0.0,
                   t_exponent=1.0, running_budget_share=0.0, new_job_kv_share=0.0,
                   new_jobs_wait_for_blocked=False)
    # The paper gives no thresholds: the replica keeps those it was first run with.
    kv = replace(config.kv, reclaim_for_ready_jobs=False, swap_before_discard=False,
                 free_copy_step_share=0.0, low_pressure=0.9, high_pressure=0.99)
    config = replace(config, mlfq=mlfq, kv=kv)
    return Scheduler(StatefulMlfq(mlfq), PressureAdaptive(profile, estimator, kv),
                      profile, estimator, config)


def _thunderagent(profile, estimator, config):
    programs = ProgramPauseResume(config.thunderagent)
    return Scheduler(programs, ThunderAgentKv(profile, estimator, programs), profile, estimator,
                     config)


def _mars(profile, estimator, config):
    return Scheduler(AgentAdmission(config.mars), WarmResumption(profile, estimator), profile,
                     estimator, config)


POLICIES: dict[str, PolicySpec] = {
    p.name: p
    for p in (
        PolicySpec(
            "vllm-fcfs",
            "vLLM as shipped: every segment is a new request, FCFS by its own arrival; the "
            "waiting queue stops at the first request that does not fit; KV dropped at each "
            "tool call (its full blocks stay in the prefix cache until evicted); preemption "
            "recomputes the latest admitted request.",
            "vLLM v1 scheduler (vllm/v1/core/sched/scheduler.py); InferCept's 'vLLM' baseline "
            "re-appends a resumed request at the end of the waiting queue.",
            _vllm,
        ),
        PolicySpec(
            "infercept",
            "FCFS by the job's original arrival; at each API yield the KV is swapped if the "
            "per-iteration swap budget hides the copy, else discarded or preserved by the "
            "smaller memory waste; jobs the budget could not swap are offered again at the "
            "next step.",
            "InferCept (ICML 2024), WukLab/InferCept vllm/core/scheduler_v2.py; same predictor "
            "as every policy (InferCept itself reads the true API time from the trace — use "
            "--predictor oracle to give it that).",
            _infercept,
        ),
        PolicySpec(
            "autellix-plas",
            "Program-level least attained service: a call's queue is its program's attained "
            "service (wall time of its earlier calls plus this one's); FCFS inside a queue; "
            "waiting/service above 8 promotes to the top queue; KV dropped at tool calls "
            "(the prefix cache may still hit).",
            "Autellix (arXiv 2502.13965, NSDI '26 'Agentix'); boundaries doubling from 1 s "
            "and β = 8 are our choice where the paper's table was not available (third-party "
            "reimplementations use 7 doubling quanta and β = 8); a work-conserving fill, and "
            "no preemption of running calls (plas.preemptive=true swaps them out; measured, "
            "it thrashes on this workload) — the choices that favour it.",
            _plas,
        ),
        PolicySpec(
            "continuum",
            "Program-level FCFS; at a tool call the KV is pinned for τ* = argmax P(T ≤ τ)·"
            "benefit − τ·price from the tool category's empirical duration CDF (exponential at "
            "cold start), dropped when τ expires, unpinned under memory pressure.",
            "Continuum (arXiv 2511.02230).",
            _continuum,
        ),
        PolicySpec(
            "astraea",
            "Stateful-MLFQ (token-cost quotas, demote on quota, promote on API yield, HRRN "
            "inside levels, aging) with a work-conserving fill, and the pressure-adaptive KV "
            "policy, which swaps paused jobs out when a ready job needs their memory "
            "(kv.reclaim_for_ready_jobs) and swaps rather than discards when the host has room "
            "(kv.swap_before_discard); the worker prefills admitted segments in MLFQ order; "
            "HRRN counts a share of the job's age in W and ranks by W / T^0.5 "
            "(mlfq.age_weight, mlfq.t_exponent); running segments are capped at 1/8 of the "
            "step token budget (mlfq.running_budget_share); where a KV copy takes under a "
            "tenth of a step (kv.free_copy_step_share) paused jobs swap even at low pressure, "
            "the new-job gate holds no prompt, and a starving job reserves the memory it "
            "waits for (mlfq.reserve_ratio).",
            "Astraea (arXiv 2512.14142) and this project's improvements (docs/design.md).",
            _astraea,
        ),
        PolicySpec(
            "astraea-paper",
            "Astraea as the paper's text reads: only the first non-empty MLFQ level is "
            "considered, and the worker keeps admission order for prefill; the "
            "pressure-adaptive KV policy from 90 % (the paper gives no thresholds), without "
            "reclaim.",
            "Astraea (arXiv 2512.14142).",
            _astraea_paper,
        ),
        PolicySpec(
            "thunderagent",
            "Program-level pause/resume: a program is REASONING or ACTING and ACTIVE or "
            "PAUSED; an ACTIVE program keeps its KV through tool calls; every 5 s, above 95 % "
            "of KV held by ACTIVE programs, ACTING programs are paused smallest first (their KV "
            "to host memory if it has room, else dropped) down to 80 %, then REASONING ones are "
            "marked to pause at their next tool call; below 85 % paused programs resume "
            "(waiting requests, then new programs, then ACTING; smallest first; best-fit "
            "decreasing over workers); in the 80-95 % band the next pause victims are soft "
            "demoted; requests of ACTIVE programs are served FCFS.",
            "ThunderAgent (arXiv 2602.13692; HaoKang-Timmy/ThunderAgent, scheduler/router.py) "
            "and the defaults of Dynamo's port (dynamo.thunderagent_router: 5 s tick, pause "
            "threshold 0.95, soft demote 0.80, pause target 0.80, resume hysteresis 0.10, "
            "resume timeout 1800 s, resume boost 1 s). Our choices, each in its favour: the "
            "working set counts context tokens (no prefix-sharing correction); a paused "
            "program's KV goes to host memory when there is room (the port counts the host "
            "tier); an idle worker resumes the first waiting program whatever its size; when "
            "an ACTIVE request does not fit, preserved KV is evicted least recently used first "
            "(vLLM's prefix cache would); the batch is filled past jobs that do not fit; the "
            "soft-demote priority jump, whose default we could not read, is 5 s; the "
            "original's optional acting-token decay (an ACTING program counts 2^-t of its "
            "context when resuming; off in its defaults) is on: it cut ThunderAgent's mean "
            "JCT on heavy-tail at QPS 4 from 113 s to 77 s.",
            _thunderagent,
        ),
        PolicySpec(
            "mars",
            "Agent admission separated from execution: at most a window of agents run at "
            "once, the window growing additively while agents wait and halving when KV use "
            "reaches 95 % with work queued or the engine preempts; continuations before new "
            "agents, feedback levels by the agent's attained GPU time, FCFS inside; at a tool "
            "call the KV stays on the GPU only if the cheapest cold resumption (recompute or "
            "host reload) costs more than predicted wait × KV share × KV use, else it goes to "
            "host memory or is dropped; ready jobs that do not fit evict preserved KV.",
            "MARS (arXiv 2604.26963). Only the abstract and summaries naming AIMD admission and "
            "multi-level feedback queues were available, not the paper's body or code (not "
            "released): the window constants (start 64, +4 per second, x0.5, floor 8), the "
            "congestion signal, the queue boundaries (doubling from 1 s) and the warm-benefit "
            "rule are ours; CPU-side admission signals do not arise in the simulator (tools "
            "are not contended).",
            _mars,
        ),
    )
}


def build_scheduler(name: str, profile: HardwareProfile, estimator: ServiceTimeEstimator,
                    config: SchedulerConfig | None = None) -> Scheduler:
    spec = POLICIES.get(name)
    if spec is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return spec.build(profile, estimator, config or SchedulerConfig())
