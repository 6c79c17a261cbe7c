"""`astraea-control-plane --worker-timeout`: the seconds of silence after which a worker is
dropped, 0 meaning never. Checked from the flag to the ServiceConfig it builds, and on a
live control plane whose silent worker is looked at an hour later."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest

import control_plane.service.server as server_module
from astraea.v1 import worker_pb2, worker_pb2_grpc
from control_plane.service.context import ServiceConfig
from control_plane.service.server import serve

HOUR = 3600.0


def config_from_flags(monkeypatch, *flags: str) -> ServiceConfig:
    """Run the control plane's main() with `flags` up to the point where it starts serving,
    and return the ServiceConfig it would serve with."""
    seen: list[ServiceConfig] = []

    async def fake_serve(listen, policy, profile, config, *args, **kwargs):
        seen.append(config)
        raise OSError("not serving in this test")

    monkeypatch.setattr(server_module, "serve", fake_serve)
    monkeypatch.setattr(server_module, "setup_service_telemetry",
                        lambda *a, **k: SimpleNamespace(metrics=None, shutdown=lambda: None))
    assert server_module.main(["--listen", "127.0.0.1:0", *flags]) == 2  # "cannot start"
    (config,) = seen
    return config


def test_the_flag_reaches_the_service_config_as_given(monkeypatch):
    assert config_from_flags(monkeypatch, "--worker-timeout", "0").worker_timeout_s == 0
    assert config_from_flags(monkeypatch, "--worker-timeout", "2.5").worker_timeout_s == 2.5
    assert config_from_flags(monkeypatch).worker_timeout_s == 10.0  # the documented default


def test_a_negative_timeout_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        server_module.main(["--worker-timeout", "-1"])
    assert info.value.code == 2
    assert "--worker-timeout must be 0 (never) or positive" in capsys.readouterr().err


async def _silent_worker_on(config: ServiceConfig):
    """A control plane with `config` and one registered worker that never speaks again."""
    running = await serve("127.0.0.1:0", "astraea", "gptj-6b-a100", config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
    await call.write(worker_pb2.WorkerMessage(register=worker_pb2.Register(
        worker_name="silent", backend="sim", kv_capacity_blocks=1000, block_size=16,
        max_num_seqs=8, max_num_batched_tokens=384)))
    assert (await asyncio.wait_for(call.read(), 5)).WhichOneof("msg") == "registered"
    return running, channel, call


@pytest.mark.parametrize("timeout_s, dropped_after_an_hour", [(0.0, False), (10.0, True)])
def test_zero_never_drops_a_silent_worker(timeout_s, dropped_after_an_hour):
    async def main() -> None:
        running, channel, call = await _silent_worker_on(ServiceConfig(worker_timeout_s=timeout_s))
        cp = running.control_plane
        try:
            await asyncio.sleep(0.05)
            (watchdog,) = [t for t in running.tasks if t.get_name() == "worker-watchdog"]
            # With 0 there is nothing to watch for: the watchdog ends at once.
            assert watchdog.done() is not dropped_after_an_hour
            dropped = cp.drop_silent_workers(time.monotonic() + HOUR)
            assert bool(dropped) is dropped_after_an_hour
            assert len(cp.registry.workers) == (0 if dropped_after_an_hour else 1)
        finally:
            call.cancel()
            await channel.close()
            await running.stop(grace=0.5)

    asyncio.run(main())
