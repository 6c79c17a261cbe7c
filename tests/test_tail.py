"""Astraea's tail settings (docs/results/tail-tuning.md): the running-segment cap, HRRN with
the job's age and a compressed T, the memory reservation for a starving job, the aged
prefill priority; that `astraea-paper` keeps the paper's behaviour; and the per-load goal
lines of `astraea bench`."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_kv_policy import FixedEstimator, paused_job
from test_kv_policy import view as kv_view

from astraea.plan import Admit, KvAction, WorkerView
from astraea.tools.bench.report import goal_check
from control_plane.core.config import KvPolicyConfig, MlfqConfig, SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.job import Job
from control_plane.core.kv_policy import PressureAdaptive
from control_plane.core.mlfq import StatefulMlfq
from control_plane.core.policies import build_scheduler

# The paper's HRRN: W is ready-but-waiting time, T is used as is.
PAPER = MlfqConfig(age_weight=0.0, t_exponent=1.0, reserve_ratio=0.0, prefill_aging_ratio=0.0)


def ready(name: str, arrival: float, ready_since: float, waited: float = 0.0) -> Job:
    j = Job(name, arrival_s=arrival)
    j.mark_ready(ready_since, 10)
    j.waiting_s = waited
    return j


def view(free: int = 5000, max_seqs: int = 256, step_time_s: float = 0.02,
         running: int = 0) -> WorkerView:
    return WorkerView(worker_id=0, total_blocks=5000, free_blocks=free, block_size=16,
                      host_free_blocks=10_000, running_seqs=running, max_seqs=max_seqs,
                      running_context_tokens=0, step_time_s=step_time_s, step_index=0)


# --- HRRN with the job's age ----------------------------------------------------------------
def test_age_weight_lets_a_job_under_way_outrank_a_new_one_with_the_same_wait():
    # At now = 100 both have waited 2 s for this segment and predict 1 s; "old" arrived at 0
    # (98 s spent running and in API waits), "new" at 98.
    def order(cfg):
        m = StatefulMlfq(cfg)
        m.add(ready("new", 98.0, 98.0), 100.0, 1.0, 1)
        m.add(ready("old", 0.0, 98.0), 100.0, 1.0, 1)
        return [j.job_id for j in m.candidates(100.0, [100])]

    assert order(replace(PAPER, age_weight=0.5))[0] == "old"
    # The paper's W ties them; the queue keeps insertion order on ties.
    assert order(PAPER) == ["new", "old"]


def test_age_weight_one_makes_w_the_jobs_age():
    m = StatefulMlfq(replace(PAPER, age_weight=1.0))
    j = ready("j", 10.0, 50.0, waited=3.0)
    m.add(j, 50.0, 2.0, 1)
    # W_eff = age = 60 − 10 = 50 at now = 60, whatever the wait: (50 + 2) / 2.
    assert m.response_ratio(j, 60.0) == pytest.approx(26.0)


def test_t_exponent_compresses_the_penalty_of_a_long_predicted_segment():
    # With t_exponent 0.5, a segment predicted 4x longer needs only 2x the wait to tie.
    m = StatefulMlfq(replace(PAPER, t_exponent=0.5))
    short, long = ready("short", 0.0, 0.0), ready("long", 0.0, 0.0)
    m.add(short, 0.0, 1.0, 1)
    m.add(long, 0.0, 4.0, 1)
    # At now = 10: short (10 + 1) / 1 = 11; long's W is 10 too: (10 + 2) / 2 = 6.
    assert m.response_ratio(short, 10.0) == pytest.approx(11.0)
    assert m.response_ratio(long, 10.0) == pytest.approx(6.0)
    hrrn = StatefulMlfq(PAPER)
    hrrn.add(ready("long", 0.0, 0.0), 0.0, 4.0, 1)
    assert hrrn.response_ratio(hrrn._levels[0]._jobs[0], 10.0) == pytest.approx(3.5)


# --- swap rather than discard ---------------------------------------------------------------
def test_swap_before_discard_swaps_what_the_waste_rule_would_drop_if_the_host_has_room(gptj):
    full = kv_view(gptj, free=50, total=10_000, step_time_s=0.0)  # u 0.995, no swap budget
    rule = PressureAdaptive(gptj, FixedEstimator(remaining=30.0),
                            KvPolicyConfig(swap_before_discard=False))
    assert rule.on_api_yield(paused_job("j", 2000), 1.0, full).action is KvAction.DISCARD
    p = PressureAdaptive(gptj, FixedEstimator(remaining=30.0), KvPolicyConfig())
    assert p.on_api_yield(paused_job("j", 2000), 1.0, full).action is KvAction.SWAP
    # No host room: discarding is all that is left.
    no_host = kv_view(gptj, free=50, total=10_000, step_time_s=0.0, host_free=0)
    assert p.on_api_yield(paused_job("j", 2000), 1.0, no_host).action is KvAction.DISCARD
    # A call shorter than the copy's round trip is not swapped either.
    soon = PressureAdaptive(gptj, FixedEstimator(remaining=1e-4), KvPolicyConfig())
    assert soon.on_api_yield(paused_job("j", 2000), 1.0, full).action is not KvAction.SWAP


# --- memory reservation for a starving job ---------------------------------------------------
def _admitted_beside_a_starving_job(gptj, reserve: float, step_time_s: float,
                                    running: int = 1) -> list[str]:
    # Both jobs are new: with new_jobs_wait_for_blocked the small one would wait anyway.
    cfg = SchedulerConfig(mlfq=replace(PAPER, reserve_ratio=reserve,
                                       new_jobs_wait_for_blocked=False))
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(), cfg)
    s.job_arrived("big", 0.0)
    s.segment_submitted("big", 0.0, 3200)  # 200 blocks
    s.job_arrived("small", 59.0)
    s.segment_submitted("small", 59.0, 16)  # 1 block
    # At 60 s big has waited 60 s: its ratio is far above 4; 150 blocks are admissible
    # (200 free less the 1 % watermark).
    plan = s.build_plan(60.0, {0: view(free=200, step_time_s=step_time_s, running=running)})
    return [a.job_id for a in plan if isinstance(a, Admit)]


def test_reserve_ratio_stops_the_fill_at_a_starving_job_whose_memory_comes_by_free_copies(gptj):
    # Copying big's 3,200 tokens of GPT-J KV takes 59 ms: free beside 1 s steps (a tenth).
    assert gptj.swap_time_s(3200) == pytest.approx(0.0587, abs=1e-4)
    assert _admitted_beside_a_starving_job(gptj, 0.0, 1.0) == ["small"]  # work-conserving
    assert _admitted_beside_a_starving_job(gptj, 4.0, 1.0) == []  # kept for the starving job


def test_reserve_ratio_lets_the_fill_go_on_where_copies_are_slow(gptj):
    # Beside 20 ms steps the same copy takes three steps: holding the fill would idle the
    # engine for as long, so the small job goes (long-context sessions lost p99 to it).
    assert _admitted_beside_a_starving_job(gptj, 4.0, 0.02) == ["small"]
    # On an idle engine no copy hides behind a step: the fill goes on there too.
    assert _admitted_beside_a_starving_job(gptj, 4.0, 1.0, running=0) == ["small"]


# --- the running-segment cap ---------------------------------------------------------------
def test_astraea_caps_running_segments_at_a_share_of_the_step_budget(gptj):
    assert gptj.max_num_batched_tokens == 384
    cfg = SchedulerConfig(mlfq=replace(MlfqConfig(), running_budget_share=0.125))
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(), cfg)
    assert s.config.max_running_per_worker == 48
    for i in range(60):
        s.job_arrived(f"j{i}", 0.0)
        s.segment_submitted(f"j{i}", 0.0, 16)
    assert len([a for a in s.build_plan(0.0, {0: view()}) if isinstance(a, Admit)]) == 48
    # A smaller explicit cap still wins.
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(),
                        replace(cfg, max_running_per_worker=10))
    assert s.config.max_running_per_worker == 10


def test_the_cap_is_astraeas_alone(gptj):
    cfg = SchedulerConfig(mlfq=replace(MlfqConfig(), running_budget_share=0.125))
    for peer in ("infercept", "vllm-fcfs", "mars", "astraea-paper"):
        assert build_scheduler(peer, gptj, OnlineJobEstimator(), cfg).config \
            .max_running_per_worker == 0


# --- the aged prefill priority ----------------------------------------------------------------
def test_prefill_aging_lets_a_long_prompt_be_overtaken_only_for_a_while():
    m = StatefulMlfq(replace(PAPER, prefill_aging_ratio=8.0))
    j = ready("j", 0.0, 0.0)
    long_first = m.engine_priority(j, 0.0, 1.0)
    # A 0.2 s segment admitted 6 s later still goes first (6 < 8 × 0.8) ...
    assert m.engine_priority(j, 6.0, 0.2) < long_first
    # ... one admitted 7 s later does not (7 > 6.4).
    assert m.engine_priority(j, 7.0, 0.2) > long_first
    # Without aging the shorter one always goes first.
    plain = StatefulMlfq(PAPER)
    assert plain.engine_priority(j, 1e6, 0.2) < plain.engine_priority(j, 0.0, 1.0)


# --- the paper variant keeps the paper's behaviour ------------------------------------------
def test_astraea_paper_turns_every_tail_setting_off(gptj):
    on = SchedulerConfig(mlfq=MlfqConfig(age_weight=10.0, t_exponent=0.5, reserve_ratio=4.0,
                                         prefill_aging_ratio=8.0, running_budget_share=0.125,
                                         new_job_kv_share=0.9, new_jobs_wait_for_blocked=True))
    s = build_scheduler("astraea-paper", gptj, OnlineJobEstimator(), on)
    mlfq = s.discipline.config
    assert (mlfq.age_weight, mlfq.t_exponent, mlfq.reserve_ratio, mlfq.prefill_aging_ratio,
            mlfq.running_budget_share) == (0.0, 1.0, 0.0, 0.0, 0.0)
    assert s.discipline.new_job_kv_share == 0.0 and not s.discipline.new_jobs_wait
    assert s.config.max_running_per_worker == 0
    assert s.kv_policy.config.swap_before_discard is False
    assert s.kv_policy.config.free_copy_step_share == 0.0


# --- the per-load goal lines ------------------------------------------------------------------
def _row(policy, mean, p99, slowdown=2.0, idle=50.0, qps=4.0):
    return {"policy": policy, "qps": qps, "mean_jct_s": mean, "p99_jct_s": p99,
            "mean_idle_jct_s": idle, "mean_slowdown": slowdown, "prediction_error": 0.0}


def test_goal_line_met_below_the_cliff():
    rows = [_row("vllm-fcfs", 100, 400), _row("infercept", 80, 300), _row("mars", 78, 320),
            _row("astraea", 77, 299), _row("astraea-paper", 10, 10)]  # variants are not peers
    [line] = goal_check(rows)
    assert line.startswith("QPS 4: vllm-fcfs slowdown 2.00 -> astraea")
    assert "best peer (mars 78.0 s)" in line and "lowest peer p99 (infercept 300.0 s)" in line
    assert line.endswith("goal met")


def test_goal_line_names_each_part_not_met():
    # Past the cliff: excess 30 against mars's 28: x1.071 > 0.5; p99 above infercept's.
    rows = [_row("vllm-fcfs", 300, 900, slowdown=20.0), _row("infercept", 90, 300, 20.0),
            _row("mars", 78, 320, 20.0), _row("astraea", 80, 310, 20.0)]
    [line] = goal_check(rows)
    assert "(past the cliff)" in line and "excess x1.071" in line
    assert line.endswith("goal NOT met: mean, p99, excess")


def test_goal_does_not_apply_at_light_load():
    rows = [_row("vllm-fcfs", 51, 400, slowdown=1.02), _row("infercept", 50.5, 300, 1.01),
            _row("astraea", 51, 310, 1.02)]
    [line] = goal_check(rows)
    assert "light load" in line and "NOT" not in line


def test_astraea_report_prints_the_goal_line_per_load(tmp_path, capsys):
    from astraea.tools.bench.report import write_json
    from astraea.tools.cli.main import main

    rows = [_row("vllm-fcfs", 300, 900, slowdown=20.0), _row("mars", 78, 320, 20.0),
            _row("astraea", 60, 310, 20.0)]
    for r in rows:
        r.update(jobs=10, jobs_completed=10, seeds=[0])
    path = tmp_path / "run.json"
    write_json(path, {}, rows, [])
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    # Excess 10 against mars's 28: x0.357 <= 0.5; mean and p99 below mars's.
    assert "QPS 4: vllm-fcfs slowdown 20.00 (past the cliff) -> astraea" in out
    assert "excess x0.357" in out and out.rstrip().endswith("goal met")
