"""The 2026 peers' distinguishing behaviour: ThunderAgent pauses and resumes whole programs,
MARS admits agents through a window and keeps KV only when a warm resumption pays."""

from __future__ import annotations

from dataclasses import replace

import pytest

from astraea.plan import Admit, Evict, JobState, KvAction, KvState, WorkerView
from astraea.tools.sim.simulator import Simulation
from astraea.workloads import generate_heavy_tail
from control_plane.core.config import MarsConfig, SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.core.mars import WarmResumption
from control_plane.core.policies import build_scheduler

BLOCK = 16


def view(total: int, free: int | None = None, host_free: int = 10_000) -> dict[int, WorkerView]:
    return {0: WorkerView(worker_id=0, total_blocks=total,
                          free_blocks=total if free is None else free, block_size=BLOCK,
                          host_free_blocks=host_free, running_seqs=0, max_seqs=256,
                          running_context_tokens=0, step_time_s=0.02, step_index=0)}


def admitted(actions) -> list[str]:
    return [a.job_id for a in actions if isinstance(a, Admit)]


# --- ThunderAgent ---------------------------------------------------------------------------
def test_thunderagent_pauses_an_acting_program_under_pressure_and_keeps_the_reasoning_one(gptj):
    s = build_scheduler("thunderagent", gptj, OnlineJobEstimator())
    programs = s.discipline
    # 100 blocks of 16 tokens. Two programs fit under the 85 % resume level: 20 + 60 blocks.
    for job_id, tokens in (("small", 20 * BLOCK), ("big", 60 * BLOCK)):
        s.job_arrived(job_id, 0.0)
        s.segment_submitted(job_id, 0.0, tokens)
    assert sorted(admitted(s.build_plan(0.0, view(100)))) == ["big", "small"]
    # Both call tools; while ACTIVE each keeps its KV through the call (ACTING, preserved).
    pause = s.segment_ended("small", 1.0, 16, 20 * BLOCK, True, "search", view(100, free=20)[0])
    assert pause.action is KvAction.PRESERVE
    # The big one's segment grew its context to 79 blocks: 21 + 79 = 100 % > 95 %.
    s.segment_ended("big", 1.0, 19 * BLOCK, 60 * BLOCK, True, "build",
                    view(100, free=0)[0])
    assert s.build_plan(2.0, view(100, free=0)) == []  # between ticks nothing changes
    actions = s.build_plan(5.0, view(100, free=0))  # the 5 s tick: pause until safe
    evicted = [a for a in actions if isinstance(a, Evict)]
    # The smallest ACTING program is paused (down to the 80 % target), its KV leaves the GPU.
    assert [a.job_id for a in evicted] == ["small"]
    assert evicted[0].action in (KvAction.SWAP, KvAction.DISCARD)
    assert programs.is_paused("small") and programs.is_active("big")
    assert s.jobs["big"].kv_state is KvState.RESIDENT
    # Its tool returns while it is paused: its request waits for a resume, not the engine.
    s.segment_submitted("small", 6.0, 10)
    assert admitted(s.build_plan(6.0, view(100, free=0))) == []
    assert s.jobs["small"].state is JobState.READY


def test_thunderagent_resumes_the_smallest_waiting_program_first(gptj):
    s = build_scheduler("thunderagent", gptj, OnlineJobEstimator())
    s.job_arrived("x", 0.0)
    s.segment_submitted("x", 0.0, 70 * BLOCK)
    assert admitted(s.build_plan(0.0, view(100))) == ["x"]
    # Two programs arrive while x holds 70 of 100 blocks: the older, larger one cannot fit
    # under 85 %; the later, smaller one waits behind it in the global queue.
    s.job_arrived("large", 0.1)
    s.segment_submitted("large", 0.1, 40 * BLOCK)
    assert admitted(s.build_plan(0.1, view(100, free=30))) == []
    s.job_arrived("tiny", 0.2)
    s.segment_submitted("tiny", 0.2, 10 * BLOCK)
    assert admitted(s.build_plan(0.2, view(100, free=30))) == []
    assert s.next_timer() == pytest.approx(5.0)
    # The tick resumes the smallest that fits (15 blocks of room): tiny, not the older large.
    assert admitted(s.build_plan(5.0, view(100, free=30))) == ["tiny"]
    assert s.discipline.is_paused("large")
    # x finishes; at the next tick there is room and large resumes.
    s.segment_ended("x", 6.0, 5, 70 * BLOCK, False, None, view(100, free=20)[0])
    assert admitted(s.build_plan(6.0, view(100, free=90))) == []
    assert admitted(s.build_plan(10.0, view(100, free=90))) == ["large"]


def test_thunderagent_admits_a_new_program_at_once_when_nothing_waits(gptj):
    s = build_scheduler("thunderagent", gptj, OnlineJobEstimator())
    for i, t in enumerate((0.0, 0.5, 1.0)):
        s.job_arrived(f"p{i}", t)
        s.segment_submitted(f"p{i}", t, 10 * BLOCK)
        assert admitted(s.build_plan(t, view(100))) == [f"p{i}"]


# --- MARS -----------------------------------------------------------------------------------
def waiting_job(job_id: str, category: str, context: int, now: float) -> Job:
    job = Job(job_id=job_id, arrival_s=0.0, state=JobState.API_WAIT, kv_state=KvState.RESIDENT,
              worker_id=0, context_tokens=context, api_start_s=now, next_tool_category=category)
    return job


@pytest.fixture
def warm(gptj):
    estimator = OnlineJobEstimator()
    for _ in range(20):
        estimator.observe_api("calc", 0.05)
        estimator.observe_api("human", 60.0)
    return WarmResumption(gptj, estimator)


def test_mars_keeps_kv_when_warm_resumption_pays_and_offloads_it_when_not(warm):
    busy = view(5000, free=500)[0]  # 90 % of KV in use
    short = warm.on_api_yield(waiting_job("a", "calc", 1000, 0.0), 0.0, busy)
    assert short.action is KvAction.PRESERVE
    assert short.inputs["warm_benefit_s"] >= short.inputs["memory_cost_s"]
    long = warm.on_api_yield(waiting_job("b", "human", 1000, 0.0), 0.0, busy)
    assert long.action is KvAction.SWAP  # host memory has room and a minute outlasts the copy
    assert long.inputs["warm_benefit_s"] < long.inputs["memory_cost_s"]
    no_host = view(5000, free=500, host_free=0)[0]
    assert warm.on_api_yield(waiting_job("c", "human", 1000, 0.0), 0.0, no_host).action \
        is KvAction.DISCARD


def test_mars_keeps_even_a_long_wait_while_memory_is_idle(warm):
    idle = view(5000)[0]  # nothing in use: holding memory costs nobody anything
    assert warm.on_api_yield(waiting_job("b", "human", 1000, 0.0), 0.0, idle).action \
        is KvAction.PRESERVE


def test_mars_admits_agents_through_its_window_and_runs_continuations_first(gptj):
    config = replace(SchedulerConfig(), mars=MarsConfig(initial_window=2, min_window=1))
    s = build_scheduler("mars", gptj, OnlineJobEstimator(), config)
    for i in range(3):
        s.job_arrived(f"a{i}", 0.0)
        s.segment_submitted(f"a{i}", 0.0, 100)
    assert sorted(admitted(s.build_plan(0.0, view(5000)))) == ["a0", "a1"]
    assert s.discipline.queue_lengths()[-1] == 1  # a2 waits for admission
    # a0 calls a tool and comes back; a1 finishes, which frees a window slot for a2.
    s.segment_ended("a0", 1.0, 10, 100, True, "calc", view(5000)[0])
    s.segment_ended("a1", 1.0, 10, 100, False, None, view(5000)[0])
    s.segment_submitted("a0", 1.5, 20)
    order = [a.job_id for a in s.build_plan(1.5, view(5000)) if isinstance(a, Admit)]
    assert order == ["a0", "a2"]  # the continuation before the newly admitted agent


@pytest.mark.parametrize("policy", ["thunderagent", "mars"])
def test_peer_finishes_every_job_of_a_loaded_heavy_tail_trace(gptj, policy):
    jobs = generate_heavy_tail(150, seed=3, qps=4.0, context_window=gptj.context_window)
    result = Simulation(jobs, gptj, policy, kv_blocks=600).run()
    assert all(r.finish_s == r.finish_s for r in result.records)  # no NaN: all finished


def test_thunderagent_pausing_several_programs_never_promises_host_room_twice(gptj):
    estimator = OnlineJobEstimator()
    for _ in range(20):
        estimator.observe_api("human", 60.0)
    s = build_scheduler("thunderagent", gptj, estimator)
    names = [f"p{i}" for i in range(5)]
    for job_id in names:  # 5 x 17 blocks = 85 % of 100: all admitted
        s.job_arrived(job_id, 0.0)
        s.segment_submitted(job_id, 0.0, 17 * BLOCK)
    assert sorted(admitted(s.build_plan(0.0, view(100)))) == names
    for job_id in names:  # each grows to 21 blocks (105 %) and calls a minute-long tool
        s.segment_ended(job_id, 1.0, 4 * BLOCK, 17 * BLOCK, True, "human", view(100, free=0)[0])
    # The tick pauses two programs (105 % → 63 %, under the 80 % target); host memory has
    # room for one paused context (21 blocks), not two: one swap, one drop.
    actions = s.build_plan(5.0, view(100, free=0, host_free=30))
    evicted = [a for a in actions if isinstance(a, Evict)]
    assert sorted(a.action.value for a in evicted) == ["discard", "swap"]
