"""A live stack for the vLLM tests: a control plane over real gRPC on loopback and one worker
driving a vLLM engine, on an event loop of their own, started once per test module (the
engine takes seconds to start)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve
from worker.process import run_worker
from worker.vllm.backend import VllmBackend


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    server: object
    backend: VllmBackend
    address: str
    worker: asyncio.Task
    reports: list = field(default_factory=list)  # filled by a test module that records them
    run_timeout_s: float = 60.0

    def run(self, coro, timeout: float | None = None):
        limit = self.run_timeout_s if timeout is None else timeout
        return self.loop.run_until_complete(asyncio.wait_for(coro, limit))


@contextlib.contextmanager
def live_stack(backend: VllmBackend, profile: str, *, register_timeout_s: float,
               run_timeout_s: float, reports: list | None = None) -> Iterator[Live]:
    """Start the stack, wait until the worker registered, yield it, and stop it."""
    loop = asyncio.new_event_loop()

    async def up() -> Live:
        server = await serve("127.0.0.1:0", "astraea", profile, ServiceConfig(time_scale=1.0))
        address = f"127.0.0.1:{server.port}"
        worker = asyncio.create_task(run_worker(address, backend, "vllm-0"))
        deadline = time.monotonic() + register_timeout_s
        while len(server.control_plane.registry.workers) < 1:
            assert not worker.done(), f"worker exited: {worker.result()}"
            assert time.monotonic() < deadline, "the vLLM worker did not register"
            await asyncio.sleep(0.05)
        return Live(loop, server, backend, address, worker,
                    reports if reports is not None else [], run_timeout_s)

    stack = loop.run_until_complete(up())
    try:
        yield stack
    finally:
        async def down() -> None:
            await stack.server.stop(grace=0.5)
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(stack.worker, 30)
        loop.run_until_complete(down())
        loop.close()
