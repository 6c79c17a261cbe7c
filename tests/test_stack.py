"""`astraea.tools.stack.Stack`, `astraea up` and `astraea demo`: the services as real processes on
free loopback ports, readiness, a job through the stack, clean shutdown, startup failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from processes import alive

from astraea.client import AgentClient, AstraeaError
from astraea.tools.cli.main import main
from astraea.tools.replay import scrape_kv_decisions
from astraea.tools.stack import Stack, StackConfig, StackError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_telemetry_export(monkeypatch):
    # The services inherit the environment: no OTLP exports or console spans from tests.
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "ASTRAEA_TELEMETRY_CONSOLE", "ASTRAEA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp_path, **kw) -> StackConfig:
    return StackConfig(**{"control_plane_listen": "127.0.0.1:0", "predictor_listen": "127.0.0.1:0",
                          "time_scale": 0.01, "workers": 2, "log_dir": str(tmp_path / "logs"),
                          **kw})


def test_stack_runs_a_job_through_separate_processes_and_shuts_down_cleanly(tmp_path):
    st = Stack(_cfg(tmp_path, control_plane_metrics="127.0.0.1:0",
                    settings=["mlfq.num_levels=3"]))
    with st:
        pids = st.pids
        assert set(pids) == {"predictor", "control-plane", "worker-w1", "worker-w2"}
        assert len(set(pids.values())) == 4 and os.getpid() not in pids.values()
        assert all(alive(pid) for pid in pids.values())
        assert st.predictor_address and st.control_plane_address.startswith("127.0.0.1:")
        client = AgentClient(st.control_plane_address)
        try:
            job = client.start_job(category="qa")
            seg = client.run_segment(job, prompt_token_ids=[1] * 20, max_tokens=8,
                                     next_tool_category="qa")
            assert len(seg.tokens) == 8
            with client.tool_call(job, "qa"):
                time.sleep(0.01)
            assert len(client.run_segment(job, prompt_token_ids=[1] * 5, max_tokens=4).tokens) == 4
            client.end_job(job)
        finally:
            client.close()
        # The control plane's /metrics: one KV decision, at the one tool call.
        decisions = scrape_kv_decisions(st.control_plane_metrics_url)
        assert sum(decisions.values()) == 1, decisions
        assert set(decisions) <= {"preserve", "swap", "discard"}
    assert st.exit_codes == dict.fromkeys(pids, 0)
    assert not [name for name, pid in pids.items() if alive(pid)]
    logs = {name: path.read_text() for name, path in st.log_files.items()}
    assert '"event": "predictor connected"' in logs["control-plane"]
    assert '"settings": {"mlfq.num_levels": 3}' in logs["control-plane"]  # passed as --set
    assert '"event": "job finished"' in logs["control-plane"]
    assert all('"event": "registered"' in logs[w] for w in ("worker-w1", "worker-w2"))
    assert st.stop() == st.exit_codes  # idempotent


def test_a_worker_that_cannot_reach_its_control_plane_fails_startup_with_its_log(tmp_path):
    dead = f"127.0.0.1:{_free_port()}"
    st = Stack(_cfg(tmp_path, workers=1, connect_control_plane=dead, startup_timeout_s=5))
    with pytest.raises(StackError) as err:
        st.start()
    msg = str(err.value)
    # The worker keeps retrying (a control plane may come back), so start-up times out.
    assert f"worker-w1 did not register with the control plane at {dead} within 5 s" in msg
    assert "control plane lost, reconnecting" in msg  # the tail of the worker's log
    assert str(st.log_files["worker-w1"]) in msg
    assert not any(alive(pid) for pid in st.pids.values())


def test_startup_failure_stops_the_processes_already_started(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        # The control plane cannot bind its port: it exits, the predictor is stopped.
        st = Stack(_cfg(tmp_path, control_plane_listen=f"127.0.0.1:{port}", workers=1))
        with pytest.raises(StackError, match="control-plane exited with code"):
            st.start()
    finally:
        busy.close()
    assert set(st.pids) == {"predictor", "control-plane"}
    assert not any(alive(pid) for pid in st.pids.values())
    assert st.exit_codes["predictor"] == 0


def test_stack_config_from_toml_with_flag_overrides(tmp_path):
    path = tmp_path / "stack.toml"
    path.write_text('policy = "vllm-fcfs"\ntime_scale = 0.1\nworkers = 3\nkv_blocks = 500\n'
                    'predictor_listen = ""\nlog_dir = "x"\n')
    cfg = StackConfig.from_toml(path, workers=2, policy=None)
    assert (cfg.policy, cfg.time_scale, cfg.workers, cfg.kv_blocks, cfg.predictor, cfg.log_dir) \
        == ("vllm-fcfs", 0.1, 2, 500, False, "x")
    path.write_text("worker = 2\n")
    with pytest.raises(StackError, match="unknown keys worker"):
        StackConfig.from_toml(path)
    path.write_text('workers = "two"\n')
    with pytest.raises(StackError, match="workers must be int"):
        StackConfig.from_toml(path)
    with pytest.raises(StackError, match="time_scale must be positive"):
        StackConfig(time_scale=0)
    # Start-up watches the workers' info lines: a quieter level would never see them.
    with pytest.raises(StackError, match="log_level must be debug or info"):
        StackConfig(log_level="warning")


def test_astraea_up_serves_until_sigterm_then_stops_every_service(tmp_path):
    cfg = tmp_path / "stack.toml"
    cport = _free_port()
    cfg.write_text(f'control_plane_listen = "127.0.0.1:{cport}"\nworkers = 1\n'
                   f'time_scale = 0.01\nlog_dir = "{tmp_path / "logs"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "astraea.tools.cli", "up", "--config", str(cfg),
                             "--no-predictor"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wlog = tmp_path / "logs" / "worker-w1.log"
        deadline = time.monotonic() + 20
        while not (wlog.exists() and '"event": "registered"' in wlog.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "stack not up"
            time.sleep(0.1)
        # Secure by default: TLS with the CA it wrote, and the client key it wrote.
        sec = tmp_path / "logs" / "security"
        ca, key = str(sec / "ca.pem"), (sec / "client.key").read_text().strip()
        with AgentClient(f"127.0.0.1:{cport}", tls_ca=ca, api_key=key) as client:
            job = client.start_job(category="qa")
            assert len(client.run_segment(job, prompt_token_ids=[1] * 3, max_tokens=2).tokens) == 2
            client.end_job(job)
        with AgentClient(f"127.0.0.1:{cport}", tls_ca=ca) as client, \
                pytest.raises(AstraeaError, match="UNAUTHENTICATED"):
            client.start_job(category="qa")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    # It told the operator how clients connect.
    assert f'AgentClient("127.0.0.1:{cport}", tls_ca="{ca}", api_key="{key}")' in err
    assert f"control plane  127.0.0.1:{cport}" in err
    assert str(tmp_path / "logs" / "control-plane.log") in err
    assert "stopped (all exited 0)" in err
    pids = [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in err.splitlines()
            if "(pid " in line]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_astraea_demo_prints_both_tables_and_where_each_job_can_be_seen(tmp_path, capsys):
    code = main(["demo", "--jobs", "4", "--time-scale", "0.005", "--no-predictor",
                 "--log-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("policy             mean") == 1  # bench's table, a row per policy
    rows = [line.split()[0] for line in out.splitlines()
            if line.startswith(("vllm-fcfs ", "astraea "))]
    assert rows == ["vllm-fcfs", "astraea"]
    assert "mean JCT, live: astraea" in out and "mean JCT, simulator on the same jobs" in out
    assert "[vllm-fcfs] 4/4 jobs done" in err and "[astraea] 4/4 jobs done" in err
    # Every service wrote its spans, and the example job's trace crosses the processes: the
    # replaying client, the control plane and the worker (the predictor is off here); under
    # astraea also the gateway the demo's OpenAI agent talks to.
    for policy, extra in (("vllm-fcfs", []), ("astraea", ["astraea-gateway"])):
        files = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / policy / "traces").iterdir())
        assert files == sorted(["astraea-control-plane", "astraea-replay", "astraea-worker",
                                *extra]), files
    # The OpenAI part: an agent on the official SDK, one job, its context kept between turns.
    assert "4 requests, 1 job: the session was found by its prompt prefix" in out
    cached = [int(line.split("cached ")[1].split()[0]) for line in out.splitlines()
              if line.startswith("  turn ")]
    assert len(cached) == 4 and cached[0] == 0 and all(c > 0 for c in cached[1:])
    tree = out.split("under astraea (start offset, duration, service):\n", 1)[1]
    for name, service in (("agent", "astraea-replay"), ("job", "astraea-control-plane"),
                          ("segment", "astraea-control-plane"), ("admission", "astraea-worker")):
        assert any(line.split()[0] == name and service in line for line in tree.splitlines()), (
            name, tree)
    assert main(["traces", str(tmp_path / "astraea" / "traces"), "--job", "j0"]) == 0
    assert "admission" in capsys.readouterr().out
