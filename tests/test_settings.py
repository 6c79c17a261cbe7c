"""Scheduling settings from the command line (`--set section.field=value`): the control plane,
`astraea up`'s config, `astraea bench-vllm` and `compare-live` take the same names as
`astraea bench`, refuse unknown ones before starting anything, and the control plane says
at start which settings differ from the defaults."""

from __future__ import annotations

import asyncio
import time

import pytest

from astraea.tools.cli.main import main as astraea_main
from astraea.tools.stack import StackConfig, StackError
from control_plane.core.config import SchedulerConfig, parse_settings
from control_plane.service.server import build_parser, serve
from control_plane.service.server import main as control_plane_main


def test_settings_parse_and_name_what_differs_from_the_defaults():
    overrides = parse_settings(["mlfq.num_levels=3", " kv.low_pressure = 0.5 "])
    assert overrides == {"mlfq.num_levels": "3", "kv.low_pressure": "0.5"}
    cfg = SchedulerConfig().with_overrides(overrides)
    assert cfg.changed() == {"mlfq.num_levels": 3, "kv.low_pressure": 0.5}
    assert SchedulerConfig().changed() == {}
    with pytest.raises(ValueError, match="section.field=value, got 'mlfq.num_levels'"):
        parse_settings(["mlfq.num_levels"])
    with pytest.raises(ValueError, match="got '=3'"):
        parse_settings(["=3"])


def test_the_control_plane_refuses_an_unknown_or_bad_setting_at_start(capsys):
    for flag, message in (("mlfq.nope=1", "unknown scheduler setting 'mlfq.nope'"),
                          ("mlfq.num_levels=three", "bad value 'three' for mlfq.num_levels"),
                          ("num_levels", "--set takes section.field=value")):
        with pytest.raises(SystemExit) as exit_:
            control_plane_main(["--listen", "127.0.0.1:0", "--set", flag])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    args = build_parser().parse_args(["--set", "mlfq.num_levels=3", "--set", "kv.watermark=0"])
    assert args.settings == ["mlfq.num_levels=3", "kv.watermark=0"]


def test_the_control_plane_schedules_with_its_settings_and_logs_them(capsys):
    async def body():
        cfg = SchedulerConfig().with_overrides({"mlfq.num_levels": "3"})
        running = await serve("127.0.0.1:0", "astraea", "gptj-6b-a100", scheduler_config=cfg)
        try:
            sched = running.control_plane.scheduler
            assert sched.config.mlfq.num_levels == 3
            assert sched.discipline.config.num_levels == 3  # the MLFQ built from it
        finally:
            await running.stop(0)
    asyncio.run(body())
    assert "mlfq.num_levels" in capsys.readouterr().out


def test_a_stack_config_checks_its_settings():
    assert StackConfig(settings=["mlfq.num_levels=3"]).settings == ["mlfq.num_levels=3"]
    with pytest.raises(StackError, match="settings: unknown scheduler setting 'mlfq.nope'"):
        StackConfig(settings=["mlfq.nope=1"])
    with pytest.raises(StackError, match="settings must be list"):
        StackConfig.from_dict({"settings": "mlfq.num_levels=3"})


def test_bench_vllm_refuses_a_bad_setting_before_starting_an_engine(capsys):
    started = time.monotonic()
    assert astraea_main(["bench-vllm", "--policies", "astraea", "--set", "kv.nope=1"]) == 2
    assert "unknown scheduler setting 'kv.nope'" in capsys.readouterr().err
    assert time.monotonic() - started < 10  # no engine, no profile measured


def test_astraea_up_passes_its_settings_to_the_stack(tmp_path):
    from astraea.tools.cli.main import build_parser
    from astraea.tools.cli.stack import up_config

    args = build_parser().parse_args(["up", "--set", "mlfq.num_levels=3", "--set",
                                      "kv.low_pressure=0.5", "--insecure"])
    assert up_config(args).settings == ["mlfq.num_levels=3", "kv.low_pressure=0.5"]
    toml = tmp_path / "stack.toml"
    toml.write_text('settings = ["mlfq.num_levels=2"]\n')
    args = build_parser().parse_args(["up", "--config", str(toml), "--insecure"])
    assert up_config(args).settings == ["mlfq.num_levels=2"]
    args = build_parser().parse_args(["up", "--set", "mlfq.bogus=1", "--insecure"])
    with pytest.raises(StackError, match="unknown scheduler setting 'mlfq.bogus'"):
        up_config(args)
