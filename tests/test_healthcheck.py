"""`python -m astraea.healthcheck`, the probe docker/compose.yaml runs, as a real process over
real gRPC on loopback against a control plane and a predictor started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

from astraea import healthcheck
from control_plane.service.context import ServiceConfig
from control_plane.service.server import SERVICE_NAMES, serve
from predictor_svc import server as predictor_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = "gptj-6b-a100"
PROBE = [sys.executable, "-m", "astraea.healthcheck"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _probe(*args: str) -> tuple[int, str, str]:
    """Run the probe as compose does, while this event loop keeps serving the control plane."""
    proc = await asyncio.create_subprocess_exec(
        *PROBE, *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def control_plane():
    server = await serve("127.0.0.1:0", "astraea", PROFILE, ServiceConfig(time_scale=0.01))
    try:
        yield server, f"127.0.0.1:{server.port}"
    finally:
        await server.stop(grace=0.5)


def test_serving_control_plane_is_healthy() -> None:
    async def main() -> None:
        async with control_plane() as (_, address):
            code, out, err = await _probe(address)
            assert code == 0, err
            assert "SERVING" in out
            for name in SERVICE_NAMES:  # each named service the control plane reports on
                code, _, err = await _probe(address, "--service", name)
                assert code == 0, (name, err)
            code, _, err = await _probe(address, "--service", "astraea.v1.NoSuchService")
            assert code == 1
            assert "NOT_FOUND" in err
    asyncio.run(main())


def test_draining_control_plane_is_unhealthy() -> None:
    async def main() -> None:
        async with control_plane() as (server, address):
            await server.health.enter_graceful_shutdown()  # what stop() and SIGTERM do first
            code, out, err = await _probe(address)
            assert code == 1
            assert out == ""
            assert f"unhealthy: {address}: NOT_SERVING" in err
    asyncio.run(main())


def test_unreachable_address_is_unhealthy_with_a_clear_message() -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    run = subprocess.run([*PROBE, address, "--timeout", "5"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 1
    assert f"unhealthy: {address}: UNAVAILABLE" in run.stderr


def test_silent_server_is_unhealthy_within_the_timeout() -> None:
    # Accepts TCP but never speaks HTTP/2: only --timeout ends the wait. Compose relies on this
    # to report unhealthy instead of killing the probe at its own timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        run = subprocess.run([*PROBE, address, "--timeout", "0.5"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - start
    assert run.returncode == 1
    assert "DEADLINE_EXCEEDED" in run.stderr
    assert elapsed < 10  # interpreter start-up plus 0.5 s, with room for a loaded machine


def test_serving_predictor_is_healthy() -> None:
    server = predictor_server.serve("127.0.0.1:0", PROFILE)
    try:
        address = f"127.0.0.1:{server.port}"
        run = subprocess.run([*PROBE, address], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        assert run.returncode == 0, run.stderr
        server.health.enter_graceful_shutdown()
        assert not healthcheck.check(address)[0]
    finally:
        server.stop(0).wait()


def test_timeout_must_be_positive() -> None:
    with pytest.raises(SystemExit) as e:
        healthcheck.main(["127.0.0.1:1", "--timeout", "0"])
    assert e.value.code == 2
