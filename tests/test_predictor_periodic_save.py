"""The predictor's state survives a SIGKILL: with --state it is saved every --save-interval
seconds while serving (atomically, and only when it changed), so a restarted predictor with
the same file estimates from what it had learnt, not from the prior."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from astraea.estimators import OnlineEstimator
from astraea.v1 import predictor_pb2, predictor_pb2_grpc
from predictor_svc.state import PeriodicSaver, PredictorState, load_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = predictor_pb2.ESTIMATE_SOURCE_MODEL
WAIT_S = 30.0  # generous: the machine may be busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, state: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE")}
    return subprocess.Popen([sys.executable, "-m", "predictor_svc.server", "--listen",
                             f"127.0.0.1:{port}", "--state", state, "--grace", "0.2", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_serving(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + WAIT_S
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "predictor not serving"
            time.sleep(0.05)


def _tts_estimate(port: int) -> predictor_pb2.Estimate:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = predictor_pb2_grpc.PredictorServiceStub(ch)
        return stub.Estimate(predictor_pb2.EstimateBatchRequest(requests=[
            predictor_pb2.EstimateRequest(job_id="j", category="tts", segment_index=1,
                                          context_tokens=100, new_tokens=10)]),
            timeout=WAIT_S).estimates[0]


def test_a_sigkilled_predictor_restarts_with_what_it_had_learnt(tmp_path):
    state, port = str(tmp_path / "predictor.json"), _free_port()
    proc = _start(port, state, "--save-interval", "0.2")
    try:
        _wait_serving(proc, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            predictor_pb2_grpc.PredictorServiceStub(ch).Observe(predictor_pb2.ObserveRequest(
                api_calls=[predictor_pb2.ApiObservation(category="tts", duration_s=d)
                           for d in (3.0, 5.0, 7.0)]), timeout=WAIT_S)
        # Written by the periodic save (nothing else saves before a SIGTERM).
        deadline = time.monotonic() + WAIT_S
        while not (os.path.exists(state)
                   and load_state(state).estimator.api_mean_s("tts") == pytest.approx(5.0)):
            assert time.monotonic() < deadline, "the state was never saved"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    again = _start(port, state)
    try:
        _wait_serving(again, port)
        e = _tts_estimate(port)
        assert e.source == MODEL and e.api_total_s == pytest.approx(5.0)
    finally:
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=WAIT_S)
    assert again.returncode == 0, err


def test_a_non_positive_save_interval_is_refused(tmp_path):
    proc = _start(_free_port(), str(tmp_path / "s.json"), "--save-interval", "0")
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2 and "--save-interval must be positive" in err


def test_the_saver_writes_only_a_changed_state_and_keeps_going_after_a_failed_write(tmp_path):
    est = OnlineEstimator()
    path = tmp_path / "dir" / "state.json"
    saver = PeriodicSaver(lambda: PredictorState(
        OnlineEstimator.from_state(est.export_state()), [], "p"), path, interval_s=0.05)
    with pytest.raises(FileNotFoundError):  # its directory does not exist yet
        saver.save_if_changed()
    path.parent.mkdir()
    assert saver.save_if_changed() and not saver.save_if_changed()  # unchanged: not rewritten
    est.observe_api("tts", 4.0)
    saver.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while load_state(path).estimator.api_mean_s("tts") != pytest.approx(4.0):
            assert time.monotonic() < deadline, "the change was never saved"
            time.sleep(0.02)
    finally:
        saver.stop()
    assert saver.saves == 2
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left
    with pytest.raises(ValueError):
        PeriodicSaver(lambda: None, path, interval_s=0)
