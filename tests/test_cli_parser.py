"""The `astraea` parser alone: every subcommand is listed and has help, and starting the command
loads none of what the commands drive (the simulator, the stack, gRPC, vLLM, numpy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from astraea.tools.cli.main import main

SUBCOMMANDS = ("bench", "report", "bench-overhead", "bench-service", "bench-soak",
               "bench-gateway", "bench-vllm", "trace", "replay", "compare-live", "up", "demo", "traces",
               "profile", "calibrate", "profiles", "certs", "chaos")


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_subcommand_in_order(capsys):
    usage = _help(capsys, ["--help"]).splitlines()[1].strip()
    assert usage == "{" + ",".join(SUBCOMMANDS) + "}"


@pytest.mark.parametrize("argv", [[c] for c in SUBCOMMANDS] + [["trace", "gen"],
                                                              ["trace", "stats"]])
def test_every_subcommand_has_help(capsys, argv):
    assert _help(capsys, [*argv, "--help"]).startswith(f"usage: astraea {' '.join(argv)} ")


def test_bench_vllm_help_names_the_benchmarks_measure_value(capsys):
    # --profile's help spells the value out, so the CLI need not import the benchmark.
    from astraea.tools.bench.vllm_live import MEASURE

    assert f"'{MEASURE}'" in " ".join(_help(capsys, ["bench-vllm", "--help"]).split())


def test_importing_the_command_line_loads_no_heavy_module():
    heavy = ("grpc", "numpy", "vllm", "torch", "asyncio", "structlog", "opentelemetry",
             "astraea.tools.sim", "astraea.tools.stack", "astraea.tools.bench",
             "astraea.tools.replay", "astraea.workloads", "astraea.v1", "control_plane",
             "worker", "predictor_svc")
    code = ("import sys, astraea.tools.cli.main\n"
            f"heavy = {heavy!r}\n"
            "print(sorted(m for m in sys.modules\n"
            "             if any(m == h or m.startswith(h + '.') for h in heavy)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_bench_service_offers_the_stores_writers(capsys):
    # The parser writes the list out (it must not import the store): it must stay the same.
    from astraea.store import STORE_WRITERS

    text = _help(capsys, ["bench-service", "--help"])
    assert "{" + ",".join(STORE_WRITERS) + "}" in text
