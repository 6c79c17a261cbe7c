"""`astraea_step_time_ratio{worker_id}`: the steps a worker reports, set against the cost
model's price for the same steps, so an operator sees a profile that does not fit the engine
(a profile measured on an idle machine, another GPU). Over real gRPC with a hand-written
worker that reports steps twice as slow as the profile says."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_admit_refused_and_history import PROFILE, WAIT_S, FakeWorker, _until, control_plane

from astraea.profile import load_profile
from astraea.v1 import common_pb2, worker_pb2


def _gauge(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.labels["worker_id"]: s.value
            for f in text_string_to_metric_families(text) if f.name == "astraea_step_time_ratio"
            for s in f.samples}


def test_the_step_time_ratio_gauge_shows_a_worker_slower_than_its_profile():
    profile = load_profile(PROFILE)
    shapes = [(256, 4096), (8, 20_000), (64, 0), (1, 300)] * 10

    async def body():
        async with control_plane() as (address, _stub, cp):
            registry = CollectorRegistry()
            cp.metrics.export_prometheus(registry)
            assert _gauge(registry) == {}  # no worker, no steps: nothing to show
            w = await FakeWorker(address, "w").register()
            try:
                await w.send(step_report=worker_pb2.StepReport(steps=[
                    common_pb2.StepTiming(step_index=i, tokens=t, context_tokens_read=c,
                                          duration_s=2 * profile.step_time_s(t, c))
                    for i, (t, c) in enumerate(shapes)]))
                await _until(lambda: str(w.worker_id) in _gauge(registry))
                assert abs(_gauge(registry)[str(w.worker_id)] - 2.0) < 1e-9
            finally:
                await w.close()
            # A worker that left is not shown.
            await _until(lambda: w.worker_id not in cp.registry.workers)
            assert _gauge(registry) == {}
    asyncio.run(asyncio.wait_for(body(), 4 * WAIT_S))
