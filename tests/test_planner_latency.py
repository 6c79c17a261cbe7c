"""A plan the event loop is slow to reach is made where a handler leaves the state consistent
(`Planner.plan_if_overdue`), and the planner task does not make it a second time."""

from __future__ import annotations

import asyncio
import time

from test_admit_refused_and_history import PROFILE, FakeWorker

from control_plane.service.context import ServiceConfig
from control_plane.service.planner import OVERDUE_S
from control_plane.service.server import serve


def test_an_overdue_plan_is_made_where_a_handler_settles_and_only_once():
    async def main():
        server = await serve("127.0.0.1:0", "astraea", PROFILE,
                             ServiceConfig(time_scale=1.0, worker_timeout_s=0))
        worker = None
        try:
            cp, planner = server.control_plane, server.planner
            worker = await FakeWorker(f"127.0.0.1:{server.port}", "w0").register()
            await asyncio.sleep(0.2)  # the registration's plan is made
            before = planner.plans
            cp.mark_dirty()
            time.sleep(3 * OVERDUE_S)  # the loop is busy (blocked) past the bound
            cp.settled()
            assert planner.plans == before + 1  # made there and then
            recorded = cp.stats.plans
            await asyncio.sleep(0.2)  # the planner task wakes for that event ...
            assert planner.plans == before + 1  # ... and finds it planned already
            assert cp.stats.plans == recorded
        finally:
            if worker is not None:
                await worker.close()
            await server.stop(grace=0.5)
    asyncio.run(main())
