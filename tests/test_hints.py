"""A client's hints (its expected output length and tool time) replace the control plane's
estimates for that segment and the API wait after it; bad hints are refused by name."""

from __future__ import annotations

import asyncio
import contextlib
import math

import grpc
import pytest

from astraea.client import AstraeaError, AsyncAgentClient
from astraea.plan import JobState
from astraea.profile import load_profile
from control_plane.core.estimates import HintedEstimator, OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.sim.backend import SimulatedBackend

PROFILE = "gptj-6b-a100"


def test_hints_win_and_observations_still_teach_the_inner_estimator():
    inner = OnlineJobEstimator()
    est = HintedEstimator(inner)
    job = Job(job_id="j", arrival_s=0.0, category="c")
    plain = est.output_tokens(job)
    assert plain == inner.output_tokens(job)
    job.hinted_output_tokens, job.hinted_api_s = 7, 12.0
    job.next_tool_category = "search"
    assert est.output_tokens(job) == 7.0 and est.api_duration_s(job) == 12.0
    job.state, job.api_start_s = JobState.API_WAIT, 100.0
    assert est.remaining_api_s(job, 104.0) == pytest.approx(8.0)
    assert est.remaining_api_s(job, 130.0) == 0.0  # overdue: about to return
    for _ in range(50):
        est.observe_api("search", 3.0)
    job.hinted_api_s = None
    assert inner.api_duration_s(job) == est.api_duration_s(job) != 12.0


@contextlib.asynccontextmanager
async def stack():
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=0.05))
    address = f"127.0.0.1:{server.port}"
    worker = asyncio.create_task(run_worker(
        address, SimulatedBackend(load_profile(PROFILE), time_scale=0.05), "w0"))
    try:
        for _ in range(500):
            if server.control_plane.registry.workers:
                break
            await asyncio.sleep(0.01)
        async with AsyncAgentClient(address) as client:
            yield server.control_plane, client
    finally:
        await server.stop(grace=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(worker, 5)


def test_hints_reach_the_scheduler_through_run_segment():
    async def go():
        async with stack() as (cp, client):
            job = await client.start_job(category="agent")
            await client.run_segment(job, prompt_token_ids=[1] * 20, max_tokens=4,
                                     temperature=0.0, next_tool_category="search",
                                     expected_output_tokens=4, expected_tool_s=30.0)
            core = cp.scheduler.jobs[job]
            assert core.state is JobState.API_WAIT
            assert (core.hinted_output_tokens, core.hinted_api_s) == (4, 30.0)
            assert cp.scheduler.estimator.api_duration_s(core) == 30.0
            # The next segment without hints goes back to the estimates.
            async with client.tool_call(job, "search"):
                pass
            await client.run_segment(job, prompt_token_ids=[1] * 3, max_tokens=2,
                                     temperature=0.0)
            assert core.hinted_output_tokens is None and core.hinted_api_s is None
            await client.end_job(job)

    asyncio.run(go())


@pytest.mark.parametrize("hint, field", [
    ({"expected_output_tokens": 0}, "expected_output_tokens"),
    ({"expected_output_tokens": 10 ** 6}, "expected_output_tokens"),
    ({"expected_tool_s": -1.0}, "expected_tool_s"),
    ({"expected_tool_s": math.nan}, "expected_tool_s"),
    ({"expected_tool_s": 1e9}, "expected_tool_s"),
])
def test_a_bad_hint_is_invalid_argument_naming_it(hint, field):
    async def go():
        async with stack() as (cp, client):
            job = await client.start_job(category="agent")
            with pytest.raises(AstraeaError) as e:
                await client.run_segment(job, prompt_token_ids=[1] * 5, max_tokens=2,
                                         temperature=0.0, **hint)
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.message
            # Nothing was queued: the job takes a good segment afterwards.
            done = await client.run_segment(job, prompt_token_ids=[1] * 5, max_tokens=2,
                                            temperature=0.0)
            assert len(done.tokens) == 2

    asyncio.run(go())
