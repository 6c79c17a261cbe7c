"""What `serve()` hands back (the running control plane / predictor) and how the control plane's
collaborators are wired: the planner through `on_change`, step timings to a `StepObserver`."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2

from astraea.profile import load_profile
from astraea.v1 import common_pb2
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import build_scheduler
from control_plane.service.context import ControlPlane, ServiceConfig
from control_plane.service.server import RunningControlPlane, serve
from predictor_svc.server import RunningPredictor
from predictor_svc.server import serve as serve_predictor

PROFILE = "gptj-6b-a100"


def _control_plane(**kwargs) -> ControlPlane:
    scheduler = build_scheduler("astraea", load_profile(PROFILE), OnlineJobEstimator())
    return ControlPlane(scheduler, ServiceConfig(), **kwargs)


def test_mark_dirty_tells_the_one_on_change_callback():
    cp = _control_plane()
    cp.mark_dirty()  # nobody listening yet: nothing happens
    calls = []
    cp.set_on_change(lambda: calls.append(1))
    cp.mark_dirty()
    cp.mark_dirty()
    assert calls == [1, 1]
    with pytest.raises(RuntimeError, match="already set"):
        cp.set_on_change(lambda: None)


def test_step_timings_go_to_the_step_observer_or_nowhere():
    steps = [common_pb2.StepTiming(tokens=4, context_tokens_read=10, duration_s=0.01)]
    _control_plane().observe_steps(steps)  # no observer: dropped

    class Observer:
        def __init__(self) -> None:
            self.seen: list = []

        def observe_steps(self, steps) -> None:
            self.seen.extend(steps)

    observer = Observer()
    _control_plane(step_observer=observer).observe_steps(steps)
    assert observer.seen == steps


def test_serve_returns_the_running_control_plane_and_stop_ends_it():
    async def main() -> None:
        running = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig())
        assert isinstance(running, RunningControlPlane)
        assert running.port > 0 and running.predictor_link is None
        assert running.control_plane.step_observer is None
        # The planner is the control plane's on_change: an event marks it dirty.
        running.control_plane.mark_dirty()
        assert running.planner._dirty.is_set()
        with pytest.raises(RuntimeError):
            running.control_plane.set_on_change(lambda: None)
        assert all(not t.done() for t in running.tasks)
        await running.stop(grace=0.1)
        assert all(t.done() for t in running.tasks)
        status = await running.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(asyncio.wait_for(main(), 30))


def test_serve_predictor_returns_the_running_predictor():
    running = serve_predictor("127.0.0.1:0", PROFILE)
    try:
        assert isinstance(running, RunningPredictor)
        assert running.port > 0
        assert running.predictor.profile.name == load_profile(PROFILE).name
    finally:
        assert running.stop(0).wait(5)
