"""Supervision in `astraea up`, with real processes on loopback: a SIGKILLed worker is
restarted and the stack keeps serving; a SIGKILLed control plane is restarted on its port and
the workers (not restarted) register with it again; a service that keeps failing at start
stops the stack with a message that says so."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astraea.client import AgentClient
from astraea.tools.stack import Stack, StackConfig, StackError, describe_exit

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0  # generous: the machine may be busy


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def _wait(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert proc is None or proc.poll() is None, f"astraea up exited waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def _job(address: str, job_id: str, logs: Path) -> int:
    # `astraea up` serves TLS and checks keys: its CA and client key are in the log dir.
    sec = logs / "security"
    with AgentClient(address, timeout=WAIT_S, tls_ca=str(sec / "ca.pem"),
                     api_key=(sec / "client.key").read_text().strip()) as client:
        client.start_job(job_id, category="qa")
        tokens = len(client.run_segment(job_id, prompt_token_ids=[1] * 8, max_tokens=6).tokens)
        client.end_job(job_id)
        return tokens


def test_astraea_up_restarts_killed_services_and_keeps_serving(tmp_path):
    logs = tmp_path / "logs"
    err_path = tmp_path / "up.err"
    port = _free_port()
    with open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "astraea.tools.cli", "up", "--workers", "2",
             "--time-scale", "0.01", "--listen", f"127.0.0.1:{port}", "--predictor-listen",
             f"127.0.0.1:{_free_port()}", "--log-dir", str(logs), "--predictor-state",
             str(tmp_path / "predictor.json")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_f, text=True)
    address = f"127.0.0.1:{port}"
    registered = '"event": "registered"'
    w1, w2 = logs / "worker-w1.log", logs / "worker-w2.log"
    try:
        _wait(lambda: "stack ready" in err_path.read_text() and "(pid " in err_path.read_text()
              and "clients connect" in err_path.read_text(), "the stack", proc)
        pids = {m[0]: int(m[1]) for m in re.findall(r"^\s+(\S+)\s+\S+\s+\(pid (\d+)\)$",
                                                     err_path.read_text(), re.MULTILINE)}
        assert set(pids) == {"predictor", "control-plane", "worker-w1", "worker-w2"}
        assert _job(address, "before", logs) == 6

        # A worker is SIGKILLed: it is restarted, registers again, and the stack serves on.
        os.kill(pids["worker-w1"], signal.SIGKILL)
        _wait(lambda: "worker-w1 restarted" in err_path.read_text(), "the restart", proc)
        _wait(lambda: _count(w1, registered) == 2, "the new worker-w1 to register", proc)
        err = err_path.read_text()
        assert (f"worker-w1 (pid {pids['worker-w1']}) exited with signal SIGKILL" in err
                and "restart 1 in 0.5 s" in err), err
        assert _job(address, "after-worker", logs) == 6

        # The control plane is SIGKILLed: restarted on its port, and both workers (not
        # restarted themselves) reconnect and register with it.
        os.kill(pids["control-plane"], signal.SIGKILL)
        _wait(lambda: "control-plane restarted" in err_path.read_text(), "the restart", proc)
        _wait(lambda: _count(w1, registered) == 3 and _count(w2, registered) == 2,
              "the workers to register with the new control plane", proc)
        assert "worker-w2 restarted" not in err_path.read_text()
        assert _job(address, "after-control-plane", logs) == 6
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT_S)
    err = err_path.read_text()
    assert proc.returncode == 0, err
    assert "stopped (all exited 0)" in err
    assert (tmp_path / "predictor.json").exists()  # saved on the way down


def test_a_service_that_keeps_failing_at_start_stops_supervision_with_a_clear_error(tmp_path):
    # The workers read their profile from this file; once it is gone, a restart cannot start.
    profile = tmp_path / "profile.json"
    shutil.copy(ROOT / "astraea" / "profiles" / "gptj-6b-a100.json", profile)
    cfg = StackConfig(control_plane_listen="127.0.0.1:0", predictor=False, workers=1,
                      time_scale=0.01, profile=str(profile), log_dir=str(tmp_path / "logs"),
                      restart_max=2, restart_backoff_s=0.1, restart_backoff_max_s=0.2)
    with Stack(cfg) as st:
        profile.unlink()
        os.kill(st.pids["worker-w1"], signal.SIGKILL)
        lines: list[str] = []
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(StackError) as err:
            while True:
                lines += st.supervise()
                assert time.monotonic() < deadline, lines
                time.sleep(0.05)
    assert [line.split(" (pid")[0].split(" restarted")[0] for line in lines] == [
        "worker-w1", "worker-w1", "worker-w1", "worker-w1"]  # exit, restart, exit, restart
    assert "restart 1 in 0.1 s" in lines[0] and "restart 2 in 0.2 s" in lines[2]
    msg = str(err.value)
    assert "worker-w1 exited with code 2" in msg
    assert "2 restarts within 60 s (restart_max 2): it keeps failing, giving up" in msg
    assert "profile file not found" in msg  # the tail of its log says why
    assert st.exit_codes["control-plane"] == 0


def test_restart_delays_double_and_reset_once_a_service_stays_up(tmp_path):
    """The schedule, with time passed in: a real process that exits at once (code 2)."""
    cfg = StackConfig(log_dir=str(tmp_path), restart_max=10, restart_stable_s=30.0)
    st = Stack(cfg, log_dir=tmp_path)
    p = st._spawn("svc", "json.tool", str(tmp_path / "missing.json"))

    def exit_then_restart(now: float) -> str:
        p.popen.wait(WAIT_S)
        (exited,) = st.supervise(now)
        assert st.supervise(now) == []  # nothing to do until the delay is over
        delay = float(exited.rsplit(" in ", 1)[1].split(" s")[0])
        (restarted,) = st.supervise(now + delay)
        assert restarted.startswith("svc restarted")
        return exited

    t = 1000.0
    p.started_s = t
    assert "exited with code 2 after 0.0 s up; restart 1 in 0.5 s" in exit_then_restart(t)
    assert "restart 2 in 1 s" in exit_then_restart(t + 1)
    assert "restart 3 in 2 s" in exit_then_restart(t + 3)
    p.started_s = t + 10  # it then stayed up 30 s: the backoff starts over
    assert "restart 4 in 0.5 s" in exit_then_restart(t + 40)
    p.popen.wait(WAIT_S)
    assert st.log_files["svc"].read_text().count("usage:") == 5  # the log is appended to

    st = Stack(StackConfig(log_dir=str(tmp_path), restart_max=0), log_dir=tmp_path)
    p = st._spawn("svc", "json.tool", str(tmp_path / "missing.json"))
    p.popen.wait(WAIT_S)
    with pytest.raises(StackError, match="svc exited with code 2 .*restart_max is 0"):
        st.supervise()


def test_supervision_settings_are_checked():
    with pytest.raises(StackError, match="restart_max must be at least 0"):
        StackConfig(restart_max=-1)
    with pytest.raises(StackError, match="restart_backoff_s must be positive"):
        StackConfig(restart_backoff_s=0)
    with pytest.raises(StackError, match="restart_backoff_max_s"):
        StackConfig(restart_backoff_s=2, restart_backoff_max_s=1)
    assert describe_exit(-9) == "signal SIGKILL" and describe_exit(2) == "code 2"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
