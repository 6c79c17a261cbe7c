"""The services' main() functions, run as real processes: structlog JSON logs on stderr, the
predictor link flag, and a clean exit (0) on SIGTERM after a graceful drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(module: str, *args: str, log_path: str | None = None) -> subprocess.Popen:
    """Start a service; its stderr goes to a pipe, or to `log_path` to be read while it runs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE",
                        "ASTRAEA_LOG_LEVEL")}
    stderr = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115 (closed in _stop)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    proc.log_path = log_path
    if log_path:
        stderr.close()  # the child holds its own descriptor
    return proc


def _wait_for_log(path: str, event: str, timeout: float = 15.0) -> None:
    """Poll a running service's JSON log until a line with `event` appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if any(json.loads(line).get("event") == event for line in f if line.strip()):
                return
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in {path} after {timeout} s")


def _wait_serving(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "service did not become SERVING"
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> tuple[int, list[dict]]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.log_path:
        with open(proc.log_path) as f:
            err = f.read()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no log lines"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert {"level", "event", "timestamp"} <= r.keys(), r
    return proc.returncode, records


def test_control_plane_main_logs_json_and_exits_cleanly_on_sigterm(tmp_path):
    port, log = _free_port(), str(tmp_path / "cp.log")
    # A predictor nobody runs: the control plane still starts and logs the fallback.
    proc = _start("control_plane.service.server", "--listen", f"127.0.0.1:{port}",
                  "--grace", "0.2", "--predictor", f"127.0.0.1:{_free_port()}", log_path=log)
    try:
        _wait_serving(port)
        _wait_for_log(log, "predictor unreachable, using local estimates")
        time.sleep(1.0)  # several retry intervals: the outage must still be logged only once
    finally:
        code, records = _stop(proc)
    assert code == 0
    events = [r["event"] for r in records]
    assert "control plane serving" in events
    assert "shutting down" in events
    warn = [r for r in records if r["event"] == "predictor unreachable, using local estimates"]
    assert len(warn) == 1 and warn[0]["level"] == "warning"  # once per outage


def test_predictor_and_worker_mains_log_json(tmp_path):
    pport, cport = _free_port(), _free_port()
    pred = _start("predictor_svc.server", "--listen", f"127.0.0.1:{pport}", "--grace", "0.2")
    cp_log, worker_log = str(tmp_path / "cp.log"), str(tmp_path / "worker.log")
    cp = worker = None
    try:
        _wait_serving(pport)  # before the control plane, so its first call finds the predictor
        cp = _start("control_plane.service.server", "--listen", f"127.0.0.1:{cport}",
                    "--grace", "0.2", "--predictor", f"127.0.0.1:{pport}", log_path=cp_log)
        _wait_serving(cport)
        worker = _start("worker.process", "--control-plane", f"127.0.0.1:{cport}",
                        "--time-scale", "0.01", "--name", "w1", log_path=worker_log)
        # Wait for the events rather than a fixed time: a loaded machine (CI) is slower.
        _wait_for_log(worker_log, "registered")
        _wait_for_log(cp_log, "predictor connected")
    finally:
        if worker is not None:
            wcode, wrec = _stop(worker)
        if cp is not None:
            ccode, crec = _stop(cp)
        pcode, prec = _stop(pred)
    assert (wcode, ccode, pcode) == (0, 0, 0)
    assert any(r["event"] == "registered" for r in wrec)
    assert any(r["event"] == "predictor connected" for r in crec)
    assert any(r["event"].startswith("predictor serving") and r["logger"] == "astraea.predictor"
               for r in prec)


def test_worker_vllm_flags_reach_the_engine_config(tmp_path):
    """`astraea-worker --backend vllm` flags as the engine gets them (nothing is started)."""
    from worker.options import build_parser, make_backend

    args = build_parser().parse_args([
        "--backend", "vllm", "--model", str(tmp_path), "--kv-blocks", "100",
        "--max-model-len", "4096", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.8",
        "--host-swap-blocks", "512"])
    config = make_backend(args).config
    assert (config.model, config.num_blocks, config.max_model_len, config.dtype) == \
        (str(tmp_path), 101, 4096, "bfloat16")  # the pool has vLLM's null block on top
    assert (config.gpu_memory_utilization, config.host_swap_blocks) == (0.8, 512)
    # Without --kv-blocks vLLM sizes the pool from memory, and the window is the model's.
    config = make_backend(build_parser().parse_args(
        ["--backend", "vllm", "--model", str(tmp_path)])).config
    assert (config.num_blocks, config.max_model_len, config.dtype) == (None, None, "auto")
