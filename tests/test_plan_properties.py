"""Every plan is executable: each policy, driven through the simulator on random long-context
agent traces, only plans actions the simulated engine can carry out, and every job ends.

The simulator applies each planned action to its engine directly; an action the engine cannot
carry out (an Evict for KV it does not hold, an Admit that does not fit, a Preempt of a job
that is not running) raises `EngineError` out of `Simulation.run`, so a refusal fails the
example instead of being skipped. The traces are what stresses the core: contexts near the
model's window, tool calls from sub-millisecond to a minute, KV pools barely larger than the
largest job, host swap space sometimes too small for a single context, several workers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from astraea.plan import Admit, KvAction, WorkerView
from astraea.profile import load_profile
from astraea.tools.sim.simulator import Simulation
from astraea.workloads.trace import JobTrace, Segment, ToolCall
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import POLICIES, build_scheduler

PROFILE = load_profile("llama3-8b-h100")
WINDOW = PROFILE.context_window
BLOCK = PROFILE.block_size
WATERMARK = SchedulerConfig().kv.watermark

tool_s = st.one_of(
    st.floats(1e-5, 0.05),  # a calculator, a cached file read
    st.floats(0.05, 5.0),  # grep, an edit, a test run
    st.floats(5.0, 60.0),  # a build, a human
)


@st.composite
def job(draw, index: int) -> JobTrace:
    calls = draw(st.integers(0, 16))
    outputs = [draw(st.integers(1, 24)) for _ in range(calls + 1)]
    results = [draw(st.integers(1, 400)) for _ in range(calls)]
    tail = sum(outputs) + sum(results)
    # The first prompt takes most of the window: up to the last token it can have.
    prompt = draw(st.integers(max(1, WINDOW // 4), WINDOW - tail))
    segments = []
    for i in range(calls + 1):
        tool = (ToolCall("tool", draw(st.sampled_from(("file", "shell"))), draw(tool_s),
                         results[i]) if i < calls else None)
        segments.append(Segment(prompt if i == 0 else 0, outputs[i], tool))
    return JobTrace(f"j{index}", tuple(segments), None, "coding-agent")


@st.composite
def scenario(draw) -> dict:
    n = draw(st.integers(3, 8))
    jobs, t = [], 0.0
    for i in range(n):
        t += draw(st.one_of(st.just(0.0), st.floats(0.0, 5.0), st.floats(0.0, 60.0)))
        jobs.append(draw(job(i)).with_id(f"j{i}", t))
    # The pool must hold the largest job alone (its whole history plus a decode block, above
    # the admission watermark), or it could never finish; beyond that, as tight as 1.0x.
    need = max(math.ceil(j.total_tokens / BLOCK) + 1 for j in jobs)
    floor = math.ceil((need + 1) / (1 - WATERMARK)) + 1
    kv_blocks = draw(st.one_of(st.integers(floor, floor + floor // 2),
                               st.integers(floor, 3 * floor)))
    # Host swap room: none to spare (a swap that does not fit), or plenty.
    host_blocks = draw(st.sampled_from((0, need // 2, need + 1, 10 * need, 10 * need, 10 * need)))
    workers = draw(st.sampled_from((1, 1, 1, 1, 2, 3)))
    return {"jobs": jobs, "kv_blocks": kv_blocks, "host_blocks": host_blocks, "workers": workers}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", list(POLICIES))
# Derandomized: the same examples on every run. No shrinking: a long-context example takes
# about 0.1 s and shrinking one would take minutes; the failing case is printed as drawn.
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=scenario())
def test_every_plan_is_executable_and_every_job_finishes(policy, case):
    profile = dataclasses.replace(
        PROFILE, host_swap_bytes=float(case["host_blocks"] * BLOCK * PROFILE.kv_bytes_per_token))
    sim = Simulation(case["jobs"], profile, policy, num_workers=case["workers"],
                     kv_blocks=case["kv_blocks"])
    result = sim.run()  # an action the engine refuses raises EngineError here
    unfinished = [r.job_id for r in result.records if math.isnan(r.finish_s)]
    assert not unfinished, f"jobs {unfinished} never finished"
    for engine in sim.engines:  # nothing left behind: every block and host copy freed
        assert engine.pool.used == 0 and engine.host_used == 0


def _outcome(sim: Simulation) -> tuple:
    result = sim.run()
    jobs = sorted((r.job_id, r.finish_s, tuple(r.ttft_s)) for r in result.records)
    engines = [(e.step, e.tokens_decoded, e.tokens_prefilled, e.preemptions,
                e.peak_used_blocks, e.last_step_s) for e in sim.engines]
    return jobs, engines, result.decision_counts, result.engine_counters


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", list(POLICIES))
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=scenario())
def test_skipping_idle_steps_changes_no_result(policy, case):
    """The simulator's shortcut (no plan when the core cannot act, quiet steps run
    back to back) gives every job the same finish time and first-token times, and every
    engine the same counters, as stepping one event at a time."""
    profile = dataclasses.replace(
        PROFILE, host_swap_bytes=float(case["host_blocks"] * BLOCK * PROFILE.kv_bytes_per_token))
    runs = [_outcome(Simulation(case["jobs"], profile, policy, num_workers=case["workers"],
                                kv_blocks=case["kv_blocks"], skip_idle_steps=skip))
            for skip in (False, True)]
    assert runs[0] == runs[1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ["vllm-fcfs", "infercept", "astraea", "thunderagent", "mars"])
def test_skipping_idle_steps_changes_no_result_on_the_mix(policy):
    """The same on the InferCept mix under load, where swaps land in the middle of long
    decode stretches (a host copy finishing frees blocks: the stretch must stop there), and
    FCFS heads, ThunderAgent's and MARS's ready jobs wait for memory between their ticks."""
    from astraea.workloads import generate_mix

    profile = load_profile("gptj-6b-a100")
    jobs = generate_mix(1000, 0, qps=2.0, context_window=profile.context_window)
    runs = [_outcome(Simulation(jobs, profile, policy, skip_idle_steps=skip))
            for skip in (False, True)]
    assert runs[0] == runs[1]


def _view(free: int, total: int = 1000, running: int = 1, swapping_out: int = 0,
          host: int = 10_000) -> dict:
    return {0: WorkerView(worker_id=0, total_blocks=total, free_blocks=free, block_size=BLOCK,
                          host_free_blocks=host, running_seqs=running, max_seqs=256,
                          running_context_tokens=0, step_time_s=0.02, step_index=0,
                          swapping_out_blocks=swapping_out)}


def test_a_blocked_fcfs_head_skips_plans_until_memory_grows_or_an_event_comes():
    """`may_act` with views: after an empty plan of a static-order discipline, shrinking
    memory and passing time keep it empty; more memory, another worker state or any event
    make it plan again."""
    sched = build_scheduler("vllm-fcfs", PROFILE, OnlineJobEstimator())
    sched.job_arrived("big", 0.0)
    sched.segment_submitted("big", 0.0, 600 * BLOCK)  # 600 blocks, 500 free
    assert sched.may_act(0.0, _view(500))  # no plan yet: nothing is known
    assert sched.build_plan(0.0, _view(500)) == []
    assert not sched.may_act(1.0, _view(500)) and not sched.may_act(9.0, _view(300))
    assert sched.blocked_floor(0) == 0  # nothing to reclaim: any shrinking keeps it blocked
    assert sched.may_act(1.0, _view(501))  # memory came back: it may fit
    assert sched.may_act(1.0, _view(400, running=2))
    assert sched.may_act(1.0, _view(400, swapping_out=5))
    assert sched.may_act(1.0)  # without views nothing is assumed
    sched.job_arrived("small", 2.0)  # an event: plan again
    assert sched.may_act(2.0, _view(500))
    sched.segment_submitted("small", 2.0, BLOCK)
    assert len(sched.build_plan(2.0, _view(700))) == 2
    assert sched.blocked_floor(0) is None  # a plan that acted says nothing about the next


def test_a_blocked_plan_with_paused_kv_stays_skipped_only_above_the_reclaim_floor():
    """A paused job's KV may be reclaimed once the blocked job's shortfall turns positive:
    the floor is where that happens, and below it the plan is not skipped."""
    sched = build_scheduler("mars", PROFILE, OnlineJobEstimator())
    sched.job_arrived("a", 0.0)
    sched.segment_submitted("a", 0.0, 100 * BLOCK)
    assert [type(x) for x in sched.build_plan(0.0, _view(1000, running=0, host=0))] == [Admit]
    # No host room: recomputing costs more than the memory the wait holds, so it is kept.
    pause = sched.segment_ended("a", 1.0, 8, 100 * BLOCK, True, "t", _view(899, host=0)[0])
    assert pause.action is KvAction.PRESERVE
    sched.job_arrived("b", 1.0)
    sched.segment_submitted("b", 1.0, 950 * BLOCK)
    reserve = int(WATERMARK * 1000)
    # "b" does not fit only because 200 blocks are being copied out: no shortfall yet.
    assert sched.build_plan(1.0, _view(899, swapping_out=200, host=0)) == []
    floor = sched.blocked_floor(0)
    assert floor == 950 + reserve - 200
    assert not sched.may_act(1.5, _view(floor, swapping_out=200, host=0))
    assert sched.may_act(1.5, _view(floor - 1, swapping_out=200, host=0))
    # Below the floor the plan does act: the paused KV is reclaimed for "b".
    assert sched.build_plan(1.5, _view(floor - 1, swapping_out=200, host=0))


def test_quiet_decode_steps_stop_before_memory_drops_below_the_floor():
    """`run_quiet_steps(min_free=...)` runs the steps that leave that many blocks free and
    stops before the one that would take the last of them; without a floor it runs on."""
    from worker.sim.engine import SimulatedEngine

    def decoding_engine() -> SimulatedEngine:
        engine = SimulatedEngine(PROFILE, 0, kv_blocks=100)
        engine.admit("j", 10 * BLOCK - 3, 0, 200, False, 0.0)  # 3 positions left in block 10
        duration, _ = engine.start_step(0.0)
        engine.finish_step(duration)
        return engine

    floored = decoding_engine()
    free = floored.pool.allocatable
    t = floored.run_quiet_steps(0.0, float("inf"), min_free=free)
    assert floored.pool.allocatable == free and 0 < floored.step <= BLOCK and t > 0
    unfloored = decoding_engine()
    unfloored.run_quiet_steps(0.0, float("inf"))
    assert unfloored.pool.allocatable < free and unfloored.step > floored.step


def test_quiet_prefill_steps_are_exactly_the_steps_one_at_a_time():
    """A long prompt prefills in chunks while another sequence decodes: `run_quiet_steps`
    runs the chunks that do not finish the prefill and stops before the one that does (its
    first token is an event), leaving the engine as stepping each one would."""
    from worker.sim.engine import SimulatedEngine

    def engine() -> SimulatedEngine:
        e = SimulatedEngine(PROFILE, 0, kv_blocks=20_000)
        e.admit("short", 40, 0, 10_000, False, 0.0)
        duration, _ = e.start_step(0.0)
        e.finish_step(duration)
        e.admit("long", 12 * PROFILE.max_num_batched_tokens + 5, 0, 50, False, duration)
        return e

    quiet, stepped = engine(), engine()
    t0 = quiet.last_step_s
    t = quiet.run_quiet_steps(t0, float("inf"))
    now = t0
    while stepped.step < quiet.step:
        duration, result = stepped.start_step(now)
        assert not result.preempted
        now += duration
        assert not stepped.finish_step(now).first_token  # none of them ends the prefill
    assert t == now and quiet.step == stepped.step == 13
    state = [(e.tokens_prefilled, e.tokens_decoded, e.last_step_s, e.last_step_tokens,
              e.last_step_context_read, e.pool.allocatable, e.peak_used_blocks,
              e.running["long"].to_prefill, e.running["long"].prefilled, e.view().step_time_s)
             for e in (quiet, stepped)]
    assert state[0] == state[1]
    # The next step finishes the prefill: both report the first token at the same time.
    ends = []
    for e in (quiet, stepped):
        duration, _ = e.start_step(t)
        ends.append((t + duration, e.finish_step(t + duration).first_token))
    assert ends[0] == ends[1] and ends[0][1] == ["long"]
    # A step longer than `max_step_s` is not run quietly.
    capped = engine()
    assert capped.run_quiet_steps(t0, float("inf"), max_step_s=1e-9) == t0 and capped.step == 1


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(samples=st.lists(st.floats(0.01, 50.0), min_size=8, max_size=80),
       started=st.floats(0.0, 30.0), elapsed=st.floats(0.0, 40.0), span=st.floats(0.0, 60.0),
       threshold=st.floats(0.0, 40.0))
def test_remaining_wait_bound_holds_at_every_instant_before_it(samples, started, elapsed, span,
                                                               threshold):
    """`remaining_api_until` gives T such that the predicted remaining wait stays at most the
    threshold at every instant in [now, T): checked on a fine grid and at every sample's own
    instant, where the window's mean residual jumps up."""
    from astraea.plan import JobState
    from control_plane.core.job import Job

    est = OnlineJobEstimator()
    for x in samples:
        est.observe_api("t", x)
    job = Job(job_id="j", arrival_s=0.0)
    job.state, job.api_start_s, job.next_tool_category = JobState.API_WAIT, started, "t"
    now, until = started + elapsed, started + elapsed + span

    def exceeds(r):
        return r > threshold

    limit = est.remaining_api_until(job, now, until, exceeds)
    assert now <= limit <= until
    grid = [now + (limit - now) * i / 500 for i in range(500)]
    grid += [started + x for x in samples if now <= started + x < limit]
    assert not any(exceeds(est.remaining_api_s(job, t)) for t in grid if t < limit)
    if limit < until:  # it stopped for a reason: the wait may exceed it from T on
        later = [started + x for x in samples if limit <= started + x < until] + [limit]
        assert any(exceeds(est.remaining_api_s(job, math.nextafter(t, math.inf)))
                   or exceeds(est.remaining_api_s(job, t)) for t in later)


def test_infercept_skips_revisits_only_while_a_wanted_swap_can_not_act():
    """A paused job InferCept wants to swap but whose context the per-step budget cannot
    hide: `revisit_quiet` says how long its revisits stay empty, they are empty at every
    step end before that, and past it the discard the bound foresaw happens."""
    from astraea.plan import JobState
    from control_plane.core.job import Job
    from control_plane.core.kv_policy import MinWaste

    est = OnlineJobEstimator()
    for x in (1.0,) * 8 + (30.0,):  # most calls take 1 s; one of nine takes 30 s
        est.observe_api("t", x)
    policy = MinWaste(PROFILE, est)
    job = Job(job_id="j", arrival_s=0.0)
    job.context_tokens = 40_000  # far beyond what one decode step's budget hides
    job.state, job.api_start_s, job.next_tool_category = JobState.API_WAIT, 0.0, "t"

    def view(step: int, step_s: float = 0.03, context: int = 400_000) -> WorkerView:
        return WorkerView(worker_id=0, total_blocks=50_000, free_blocks=10_000,
                          block_size=BLOCK, host_free_blocks=100_000, running_seqs=4,
                          max_seqs=256, running_context_tokens=context, step_time_s=step_s,
                          step_index=step)

    # Expected 4.2 s more: preserving wastes less than recomputing 40,000 tokens would.
    assert policy.on_api_yield(job, 0.0, view(0)).action is KvAction.PRESERVE
    assert not policy.revisit_idle(0.0)  # it wants the swap: a revisit may act any time
    limit, longest = policy.revisit_quiet(0.0, 1e9, [job], view(0), stepping=True)
    # Once 1 s has passed, only the 30 s call is left: 29 s more, and discarding wins.
    assert 0.99 < limit <= 1.0 and 0.0 < longest < float("inf")
    # A step a little longer than `longest` renews a budget that hides the whole swap.
    assert policy.budget.peek(view(1, step_s=longest)) < job.context_tokens
    assert policy.budget.peek(view(1, step_s=longest * 1.001)) >= job.context_tokens
    t, step = 0.0, 1
    while t < limit:
        assert policy.revisit(t, [job], view(step, step_s=longest)) == []
        t, step = t + 0.02, step + 1
    acted = [policy.revisit(limit + dt, [job], view(step + i, step_s=longest))
             for i, dt in enumerate((0.0, 0.01, 0.5, 1.0, 2.0))]
    assert any(d and d[0].action is KvAction.DISCARD for d in acted)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(levels=st.lists(st.lists(st.integers(1, 40), max_size=90), min_size=8, max_size=8),
       slopes=st.lists(st.sampled_from((-8, 0, 8)), min_size=8, max_size=8),
       rooms=st.lists(st.integers(0, 10**6), min_size=1, max_size=12))
def test_autellix_candidates_are_every_fitting_job_in_level_order(levels, slopes, rooms):
    """Autellix passes over runs of queued jobs none of which fits the room at once: the jobs
    it offers are exactly those a job-by-job scan offers, in the same order, as the room
    shrinks while the builder takes them."""
    import control_plane.core.discipline as discipline
    from control_plane.core.config import PlasConfig
    from control_plane.core.job import Job

    plas = discipline.Plas(PlasConfig())
    n = 0
    for level, needs in enumerate(levels):
        for i, need in enumerate(needs):  # needs that grow or shrink along the queue
            need = max(1, need + slopes[level] * (i // discipline.SPAN) + 40)
            job = Job(job_id=f"j{n}", arrival_s=0.0)
            job.mark_ready(float(n), 1)
            job.attained_s = 0.0 if level == 0 else PlasConfig().boundaries_s[level - 1]
            plas.add(job, float(n), 1.0, need)
            n += 1
    plas._last_starvation_check = float("inf")  # no promotion: the order is what is tested
    # Rooms exactly some job's need, often: the edges where `<=` and `<` part.
    present = sorted(plas._need.values()) or [0]
    sizes_drawn = [present[r % len(present)] - r % 2 for r in rooms]

    def offered(candidates) -> list[str]:
        room, out, sizes = [10**9], [], iter(sizes_drawn)
        for job in candidates(room):
            out.append(job.job_id)
            room[0] = min(room[0], next(sizes, 0))  # the builder lowers the room as it takes
        return out

    def scan(room):
        for level in plas._levels:
            for job in level.snapshot(discipline.CANDIDATE_WINDOW):
                if plas._need[job.job_id] <= room[0]:
                    yield job

    assert offered(lambda room: plas.candidates(0.0, room)) == offered(scan)
