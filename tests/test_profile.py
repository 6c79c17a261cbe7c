"""Hardware profiles: built-ins, the cost model, and errors for bad profile files."""

from __future__ import annotations

import json

import pytest
from conftest import profile_dict

from astraea.profile import BUILTIN_PROFILES, HardwareProfile, ProfileError, load_profile


@pytest.mark.parametrize("name", BUILTIN_PROFILES)
def test_builtin_profiles_load_and_are_consistent(name):
    p = load_profile(name)
    assert p.name == name
    assert p.kv_capacity_blocks > 0 and p.host_swap_blocks > 0
    assert p.max_num_seqs <= p.max_num_batched_tokens
    assert p.sources  # every figure carries its source
    # A whole context window fits in the KV cache.
    assert p.kv_capacity_blocks * p.block_size >= p.context_window


def test_gptj_figures_match_the_design_calibration():
    p = load_profile("gptj-6b-a100")
    m = 2 * 28 * 4096 * 2
    assert p.kv_bytes_per_token == m
    # KV capacity = GPU memory × utilisation − weights, in 16-token blocks.
    assert p.kv_capacity_blocks == int((80e9 * 0.9 - 12.1e9) // (m * 16))
    assert p.step_time_s(384, 0) == pytest.approx((10 + 0.0463 * 384) / 1e3)
    # k = bytes per token / 1.3 TB/s (in ms per context token).
    assert p.step_time_s(1, 10_000) == pytest.approx((10 + 0.0463 + 10_000 * m / 1.3e12 * 1e3) / 1e3)
    assert p.swap_time_s(1000) == pytest.approx(1000 * m / 25e9)
    assert load_profile("vicuna-13b-2xa100").kv_bytes_per_token == 2 * 40 * 5120 * 2


def test_table_step_time_interpolates_and_extrapolates():
    p = load_profile("llama3-8b-h100")  # points (1, 8) (128, 10) (512, 17) (1024, 28.5) (2048, 59)
    assert p.non_attention_ms(1) == pytest.approx(8.0)
    assert p.non_attention_ms(0) == pytest.approx(8.0)
    assert p.non_attention_ms(320) == pytest.approx(10 + 7 * (320 - 128) / 384)
    assert p.non_attention_ms(1024) == pytest.approx(28.5)
    assert p.non_attention_ms(3072) == pytest.approx(59 + (59 - 28.5) * 1024 / 1024)


def test_prefill_time_is_chunked_by_the_step_budget(simple_profile):
    # Budget 64: 150 tokens = 64 + 64 + 22, each step 10 ms + 0.1 ms/token.
    assert simple_profile.prefill_time_s(150) == pytest.approx((3 * 10 + 0.1 * 150) / 1e3)
    # With 1000 prior tokens every chunk also reads them (k = 1e-3 ms per token).
    assert simple_profile.prefill_time_s(150, 1000) == pytest.approx((3 * 10 + 15 + 3 * 1.0) / 1e3)
    assert simple_profile.prefill_time_s(0) == 0.0


def test_load_profile_from_a_path(write_json):
    path = write_json("mine.json", profile_dict(name="mine"))
    assert load_profile(path).name == "mine"


def test_unknown_profile_name_lists_the_builtins():
    with pytest.raises(ProfileError) as info:
        load_profile("gpt-9000")
    assert "gpt-9000" in str(info.value)
    for name in BUILTIN_PROFILES:
        assert name in str(info.value)


def test_missing_profile_file_is_named(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(ProfileError, match=rf"profile file not found: {path}"):
        load_profile(str(path))


def test_invalid_json_profile_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(ProfileError, match=rf"{path}: invalid JSON"):
        load_profile(str(path))


def _without(field):
    d = profile_dict()
    del d[field]
    return d


BAD = [
    ("missing name", _without("name"), "name"),
    ("missing kv bytes", _without("kv_bytes_per_token"), "kv_bytes_per_token"),
    ("missing step time", _without("step_time"), "step_time"),
    ("missing c_ms", profile_dict(step_time={"kind": "linear", "a_ms_per_token": 0.1}), "c_ms"),
    ("unknown kind", profile_dict(step_time={"kind": "cubic"}), "step_time.kind"),
    ("one table point", profile_dict(step_time={"kind": "table", "points_tokens_ms": [[1, 5.0]]}),
     "points_tokens_ms"),
    ("unsorted table", profile_dict(step_time={"kind": "table", "points_tokens_ms": [[10, 5.0], [5, 6.0]]}),
     "points_tokens_ms"),
    ("text number", profile_dict(kv_bytes_per_token="lots"), "lots"),
    # A flat step time makes prefill free, and the MLFQ's token cost divides by its price.
    ("flat table", profile_dict(step_time={"kind": "table", "points_tokens_ms": [[1, 2.2], [256, 2.2]]}),
     "step time must grow"),
    ("free prefill", profile_dict(step_time={"kind": "linear", "c_ms": 10.0, "a_ms_per_token": 0.0}),
     "step time must grow"),
    ("weights fill the GPU", profile_dict(weights_bytes=2e9), "KV capacity"),
    ("more seqs than budget", profile_dict(max_num_seqs=100, max_num_batched_tokens=64), "max_num_seqs"),
]


@pytest.mark.parametrize("what, data, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_profiles_raise_profile_error_naming_file_and_problem(write_json, what, data, needle):
    path = write_json("bad.json", data)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert path in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize("field", ["block_size", "kv_bytes_per_token", "attention_bandwidth_bytes_per_s",
                                   "swap_bandwidth_bytes_per_s", "max_num_seqs"])
def test_non_positive_sizes_and_rates_are_rejected_at_load(write_json, field):
    """Zero block size or KV bytes crash the loader with ZeroDivisionError, zero bandwidths
    divide by zero mid-simulation, zero sequences silently run nothing: a clear
    ProfileError naming the field is what a user needs."""
    path = write_json("zero.json", profile_dict(**{field: 0}))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert path in str(info.value) and field in str(info.value)


def test_profile_json_that_is_not_an_object_is_a_profile_error(write_json):
    with pytest.raises(ProfileError):
        load_profile(write_json("list.json", [1, 2, 3]))


def test_from_dict_round_trips_builtin_json():
    from importlib import resources

    text = resources.files("astraea.profiles").joinpath("gptj-6b-a100.json").read_text()
    assert HardwareProfile.from_dict(json.loads(text)) == load_profile("gptj-6b-a100")


# --- calibration against a live engine -----------------------------------------------------------
def test_a_calibrated_profile_prices_every_step_by_the_live_factor(tmp_path, capsys):
    from astraea.profile import step_time_ratio
    from astraea.tools.cli.main import main

    gptj = load_profile("gptj-6b-a100")  # a linear step model
    steps = [(256, 4096), (8, 20000), (1, 300)]
    # The engine took 1.5x the price of each step (its median too).
    state = tmp_path / "predictor-state.json"
    state.write_text(json.dumps({"step_samples": [[t, c, 1.5 * gptj.step_time_s(t, c)]
                                                  for t, c in steps]}))
    out = tmp_path / "calibrated.json"
    assert main(["calibrate", "gptj-6b-a100", str(state), "--out", str(out)]) == 0
    assert "3 steps took 1.500x" in capsys.readouterr().out
    cal = load_profile(str(out))
    for tokens, context in [*steps, (64, 0), (384, 100_000)]:
        assert cal.step_time_s(tokens, context) == pytest.approx(
            1.5 * gptj.step_time_s(tokens, context))
    assert cal.prefill_time_s(1000, 500) == pytest.approx(1.5 * gptj.prefill_time_s(1000, 500))
    # What a step factor says nothing about is kept.
    assert (cal.kv_capacity_blocks, cal.swap_bandwidth_bytes_per_s, cal.context_window) == \
        (gptj.kv_capacity_blocks, gptj.swap_bandwidth_bytes_per_s, gptj.context_window)
    assert "x1.500" in cal.sources["calibration"] and cal.name == "gptj-6b-a100-calibrated"
    # Calibrated against its own steps, a profile needs no more correction.
    assert step_time_ratio(cal, json.loads(state.read_text())["step_samples"])["total"] == \
        pytest.approx(1.0)


def test_a_table_profile_calibrates_too_and_bad_step_files_are_refused(tmp_path, capsys):
    from astraea.profile import load_profile_data, scale_step_time
    from astraea.tools.cli.main import main

    data, _ = load_profile_data("gptj-6b-a100")
    data = {**data, "step_time": {"kind": "table",
                                  "points_tokens_ms": [[1, 10.0], [64, 20.0], [512, 90.0]]}}
    table = HardwareProfile.from_dict(data)
    scaled = HardwareProfile.from_dict(scale_step_time(data, 0.5, "test"))
    assert scaled.step_time_s(100, 2000) == pytest.approx(0.5 * table.step_time_s(100, 2000))
    with pytest.raises(ProfileError, match="must be positive"):
        scale_step_time(data, 0.0, "test")
    for text, needle in (("{}", "no step_samples"), ("not json", "no step_samples"),
                         ('{"step_samples": [[1, 2]]}', "[tokens, context, seconds] rows"),
                         ('{"step_samples": []}', "no timed steps")):
        (tmp_path / "s.json").write_text(text)
        assert main(["calibrate", "gptj-6b-a100", str(tmp_path / "s.json"), "--out",
                     str(tmp_path / "o.json")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
    assert main(["calibrate", "gptj-6b-a100", str(tmp_path / "none.json"), "--out",
                 str(tmp_path / "o.json")]) == 2
    assert "no such file" in capsys.readouterr().err
