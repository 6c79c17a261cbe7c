"""The pure scheduling core: event validation, plans, and memory bookkeeping in views."""

from __future__ import annotations

import pytest

from astraea.plan import Admit, Evict, JobState, KvAction, KvState, Preempt, WorkerView
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator
from control_plane.core.policies import POLICIES, build_scheduler
from control_plane.core.scheduler import SchedulerError


def view(free: int = 5000, total: int = 5000, worker: int = 0, running: int = 0,
         host_free: int = 10_000, **kw) -> WorkerView:
    return WorkerView(worker_id=worker, total_blocks=total, free_blocks=free, block_size=16,
                      host_free_blocks=host_free, running_seqs=running, max_seqs=256,
                      running_context_tokens=0, step_time_s=0.02, step_index=0, **kw)


def admit_fields(a):
    assert isinstance(a, Admit), a
    return (a.job_id, a.worker_id, a.new_tokens, a.context_tokens, a.swap_in)


def running_job(sched, job_id="j", tokens=100, now=0.0):
    sched.job_arrived(job_id, now)
    sched.segment_submitted(job_id, now, tokens, "qa")
    actions = sched.build_plan(now, {0: view()})
    assert any(isinstance(a, Admit) and a.job_id == job_id for a in actions)
    return sched.jobs[job_id]


@pytest.fixture
def sched(gptj):
    return build_scheduler("astraea", gptj, OnlineJobEstimator())


def test_unknown_policy_is_rejected_with_the_known_names(gptj):
    with pytest.raises(ValueError) as info:
        build_scheduler("sjf", gptj, OnlineJobEstimator())
    assert "sjf" in str(info.value)
    for name in POLICIES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_builds_and_admits_a_job(gptj, name):
    s = build_scheduler(name, gptj, OnlineJobEstimator())
    s.job_arrived("a", 0.0)
    s.segment_submitted("a", 0.0, 100)
    actions = s.build_plan(0.0, {0: view()})
    assert [admit_fields(a) for a in actions] == [("a", 0, 100, 0, False)]
    assert s.jobs["a"].state is JobState.RUNNING


# --- event validation -----------------------------------------------------------------------
def test_duplicate_job_id_is_rejected(sched):
    sched.job_arrived("a", 0.0)
    with pytest.raises(SchedulerError, match="duplicate job id 'a'"):
        sched.job_arrived("a", 1.0)


@pytest.mark.parametrize("call", [
    lambda s: s.segment_submitted("ghost", 0.0, 10),
    lambda s: s.segment_ended("ghost", 0.0, 1, 1, False, None, view()),
    lambda s: s.segment_preempted("ghost", 0.0, 1),
    lambda s: s.job_cancelled("ghost", 0.0),
])
def test_events_for_an_unknown_job_raise_scheduler_error_naming_it(sched, call):
    with pytest.raises(SchedulerError, match="unknown job id 'ghost'"):
        call(sched)


def test_negative_token_count_is_rejected(sched):
    sched.job_arrived("a", 0.0)
    with pytest.raises(SchedulerError, match="a.*negative"):
        sched.segment_submitted("a", 0.0, -5)
    assert sched.jobs["a"].state is JobState.ARRIVED


def test_submitting_while_ready_or_running_is_rejected(sched):
    sched.job_arrived("a", 0.0)
    sched.segment_submitted("a", 0.0, 10)
    with pytest.raises(SchedulerError, match="a.*ready"):
        sched.segment_submitted("a", 0.5, 10)
    sched.build_plan(1.0, {0: view()})
    with pytest.raises(SchedulerError, match="a.*running"):
        sched.segment_submitted("a", 1.5, 10)


def test_segment_end_for_a_job_that_is_not_running_is_rejected(sched):
    sched.job_arrived("a", 0.0)
    sched.segment_submitted("a", 0.0, 10)
    with pytest.raises(SchedulerError, match="job a is not running on worker 0"):
        sched.segment_ended("a", 1.0, 5, 10, False, None, view())
    assert sched.jobs["a"].state is JobState.READY


def test_segment_end_reported_by_the_wrong_worker_is_rejected(sched):
    running_job(sched, "a")
    with pytest.raises(SchedulerError, match="job a is not running on worker 1"):
        sched.segment_ended("a", 1.0, 5, 10, False, None, view(worker=1))
    assert sched.jobs["a"].state is JobState.RUNNING


def test_preempting_a_job_that_is_not_running_is_rejected(sched):
    sched.job_arrived("a", 0.0)
    sched.segment_submitted("a", 0.0, 10)
    with pytest.raises(SchedulerError, match="job a is not running"):
        sched.segment_preempted("a", 1.0, 0)


# --- event effects --------------------------------------------------------------------------
def test_segment_end_without_tool_finishes_the_job(sched):
    running_job(sched, "a", tokens=100)
    assert sched.segment_ended("a", 2.0, 30, 100, False, None, view()) is None
    job = sched.jobs["a"]
    assert job.state is JobState.FINISHED and job.context_tokens == 130
    sched.forget_finished("a")
    assert "a" not in sched.jobs


def test_tool_call_yields_a_pause_with_the_kv_policys_decision(sched):
    running_job(sched, "a", tokens=100)
    pause = sched.segment_ended("a", 2.0, 30, 100, True, "qa", view(free=4900))
    assert pause.job_id == "a" and pause.worker_id == 0
    assert pause.action is KvAction.PRESERVE  # astraea at 2 % utilisation
    assert sched.decision_counts["preserve"] == 1
    assert "a" in sched.paused[0]
    # The tool returns: the job is ready again and no longer paused.
    sched.segment_submitted("a", 3.0, 20)
    assert "a" not in sched.paused[0]
    assert sched.jobs["a"].state is JobState.READY


def test_a_resident_job_is_resumed_with_only_its_new_tokens(sched):
    running_job(sched, "a", tokens=100)
    sched.segment_ended("a", 2.0, 30, 100, True, "qa", view(free=4900))
    sched.segment_submitted("a", 3.0, 20)
    actions = sched.build_plan(3.0, {0: view(free=4890)})
    assert [admit_fields(a) for a in actions] == [("a", 0, 20, 130, False)]


def test_admissions_update_the_view_and_respect_free_memory(gptj):
    s = build_scheduler("astraea", gptj, OnlineJobEstimator())
    for i, tokens in enumerate((800, 800, 800)):  # 50 blocks each
        s.job_arrived(f"j{i}", float(i))
        s.segment_submitted(f"j{i}", float(i), tokens)
    v = view(free=130, total=10_000)  # watermark 1 % = 100 blocks → 30 admissible
    assert s.build_plan(3.0, {0: v}) == []
    v = view(free=210, total=10_000)  # 110 admissible: two jobs
    admitted = [a.job_id for a in s.build_plan(4.0, {0: v}) if isinstance(a, Admit)]
    assert len(admitted) == 2
    assert v.free_blocks == 210 - 100 and v.running_seqs == 2


def test_a_resident_ready_job_that_needs_no_new_blocks_is_admitted_when_memory_is_full(sched):
    """Its KV is already on the GPU: refusing it (the watermark is for *new* blocks) leaves
    that memory held by a job that can never run — the engine idles forever."""
    running_job(sched, "a", tokens=100)
    pause = sched.segment_ended("a", 2.0, 10, 100, True, "qa", view(free=4900))
    assert pause.action is KvAction.PRESERVE
    # 110 tokens hold 7 blocks (112 slots): 2 more tokens need no new block.
    sched.segment_submitted("a", 3.0, 2)
    assert sched.jobs["a"].kv_state is KvState.RESIDENT
    actions = sched.build_plan(3.0, {0: view(free=0, total=5000)})
    assert [a.job_id for a in actions if isinstance(a, Admit)] == ["a"]


def test_a_resumed_job_one_token_past_a_block_boundary_needs_a_new_block(gptj):
    """A history of k·16 + 1 tokens fills only k blocks: its last sampled token has no KV
    until the next segment feeds it back. Counting k + 1 blocks as held, the scheduler saw
    the resumed segment's new block as free and planned Admits the worker refused."""
    config = SchedulerConfig().with_overrides({"kv.watermark": "0"})
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(), config)
    running_job(s, "a", tokens=100)
    pause = s.segment_ended("a", 2.0, 13, 100, True, "qa", view(free=4900))  # history 113
    assert pause.action is KvAction.PRESERVE  # the worker holds ⌈112/16⌉ = 7 blocks
    s.segment_submitted("a", 3.0, 3)  # 116 tokens: 8 blocks, one more than it holds
    s.job_arrived("b", 3.0)
    s.segment_submitted("b", 3.0, 32)  # 2 blocks
    v = view(free=2, total=50)  # room for "a"'s new block and one more: not for "b" too
    admitted = [a.job_id for a in s.build_plan(3.0, {0: v}) if isinstance(a, Admit)]
    assert len(admitted) == 1
    assert v.free_blocks == 2 - {"a": 1, "b": 2}[admitted[0]]


def test_a_kv_release_in_the_view_frees_the_blocks_of_the_kv_positions(gptj):
    """Without exact per-job counts (the live service's views) a discarded history of
    k·16 + 1 tokens gives back k blocks, not k + 1."""
    s = build_scheduler("vllm-fcfs", gptj, OnlineJobEstimator())
    running_job(s, "a", tokens=100)
    v = view(free=100)
    pause = s.segment_ended("a", 2.0, 13, 100, True, "qa", v)  # history 113: 7 blocks
    assert pause.action is KvAction.DISCARD
    assert v.free_blocks == 107


def test_reclaim_evicts_paused_kv_for_a_ready_job_that_does_not_fit(gptj):
    config = SchedulerConfig().with_overrides({"kv.reclaim_for_ready_jobs": "true"})
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(prior_api_s=30.0), config)
    running_job(s, "paused", tokens=3200)  # 200 blocks
    pause = s.segment_ended("paused", 1.0, 10, 3200, True, "chat", view(free=4000))
    assert pause.action is KvAction.PRESERVE
    s.job_arrived("new", 1.5)
    s.segment_submitted("new", 1.5, 1600)  # 100 blocks
    v = view(free=60, total=5000, blocks_of=lambda j: 201 if j == "paused" else 0)
    actions = s.build_plan(2.0, {0: v})
    evicts = [a for a in actions if isinstance(a, Evict)]
    assert [(e.job_id, e.action) for e in evicts] == [("paused", KvAction.SWAP)]
    assert s.jobs["paused"].kv_state is KvState.SWAPPED
    assert "paused" not in s.paused[0]
    # Counted apart from the decision at the tool call (the metric's cause label "reclaim").
    assert dict(s.decision_counts) == {"preserve": 1, "reclaim_swap": 1}


def test_plas_preempts_a_lower_queue_call_to_admit_a_higher_one(gptj):
    config = SchedulerConfig().with_overrides({"plas.preemptive": "true"})
    s = build_scheduler("autellix-plas", gptj, OnlineJobEstimator(), config)
    old = running_job(s, "old", tokens=1600, now=0.0)
    # "old" has run for 20 s: its program's attained service puts it in the last queue.
    s.job_arrived("new", 20.0)
    s.segment_submitted("new", 20.0, 1600)
    v = view(free=60, total=5000, running=1, preemptible=lambda j: True,
             blocks_of=lambda j: 101 if j == "old" else 0)
    actions = s.build_plan(20.0, {0: v})
    pre = [a for a in actions if isinstance(a, Preempt)]
    assert [p.job_id for p in pre] == ["old"]
    assert old.preempting
    s.segment_preempted("old", 20.0, 3, pre[0].action)
    assert old.state is JobState.READY and old.context_tokens == 1603


def test_config_overrides_parse_values_and_reject_unknown_keys():
    cfg = SchedulerConfig().with_overrides(
        {"mlfq.num_levels": "3", "kv.low_pressure": "0.25", "mlfq.work_conserving": "false",
         "plas.boundaries_s": "1/2/4"})
    assert cfg.mlfq.num_levels == 3 and cfg.kv.low_pressure == 0.25
    assert cfg.mlfq.work_conserving is False and cfg.plas.boundaries_s == (1.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="mlfq.nope"):
        SchedulerConfig().with_overrides({"mlfq.nope": "1"})
    with pytest.raises(ValueError, match="bad value 'x' for mlfq.num_levels"):
        SchedulerConfig().with_overrides({"mlfq.num_levels": "x"})


def test_a_lost_worker_requeues_its_running_and_kept_jobs_with_their_kv_discarded(sched):
    running = running_job(sched, "run", tokens=320)
    paused = running_job(sched, "paused", tokens=160)
    pause = sched.segment_ended("paused", 1.0, 8, 160, True, "qa", view())
    assert pause.action is KvAction.PRESERVE  # low pressure: its KV stays on worker 0
    affected = sched.worker_lost(0, 2.0, {"run": 5})
    assert sorted(affected) == ["paused", "run"]
    # The running segment is ready again, with what it generated kept, and must recompute.
    assert running.state is JobState.READY and running.kv_state is KvState.DISCARDED
    assert running.context_tokens == 325 and running.tokens_to_prefill == 325
    # The paused job waits for its tool as before, but its KV is gone.
    assert paused.state is JobState.API_WAIT and paused.kv_state is KvState.DISCARDED
    assert 0 not in sched.running and 0 not in sched.paused
    # Another worker picks the running job up, recomputing its context.
    actions = sched.build_plan(2.0, {1: view(worker=1)})
    assert [admit_fields(a) for a in actions] == [("run", 1, 0, 325, False)]


def test_a_draining_worker_keeps_its_running_segments_and_loses_its_kept_kv(sched):
    running = running_job(sched, "run", tokens=320)
    paused = running_job(sched, "paused", tokens=160)
    sched.segment_ended("paused", 1.0, 8, 160, True, "qa", view())
    assert paused.kv_state is KvState.RESIDENT
    assert sched.drop_kept_kv(0, 2.0) == ["paused"]
    # The running segment goes on there; the paused job's KV no longer counts as kept.
    assert running.state is JobState.RUNNING and running.worker_id == 0
    assert paused.state is JobState.API_WAIT and paused.kv_state is KvState.DISCARDED
    assert not sched.paused[0] and sched.drop_kept_kv(0, 2.0) == []
    # Back from its tool, it is admitted on another worker and recomputes its context (the
    # draining worker is not among the views planned with).
    sched.segment_submitted("paused", 3.0, 20, None)
    actions = sched.build_plan(3.0, {1: view(worker=1)})
    assert [admit_fields(a) for a in actions] == [("paused", 1, 20, 168, False)]
    sched.segment_ended("run", 4.0, 8, 320, False, None, view())
    assert running.state is JobState.FINISHED


# --- admission decisions (what traces record) ------------------------------------------------
def test_admission_decision_carries_the_hrrn_score_it_won_with(gptj):
    s = build_scheduler("astraea", gptj, OnlineJobEstimator())
    seen = []
    s.on_admit = lambda decision, job: seen.append((decision, job.waiting_now(3.0)))
    s.job_arrived("a", 0.0)
    s.segment_submitted("a", 0.0, 100, "qa")
    s.build_plan(3.0, {0: view()})  # waited 3 s: the score is (W + T) / T > 1
    (decision, waited), = seen
    # HRRN ranks by T^t_exponent (W is the job's age here: it has waited since it arrived).
    predicted = s.predicted_compute_s(s.jobs["a"]) ** s.config.mlfq.t_exponent
    assert (decision.job_id, decision.worker_id, decision.queue_level) == ("a", 0, 0)
    assert decision.score == pytest.approx((waited + predicted) / predicted)


def test_admission_decision_has_no_score_under_a_discipline_without_one(gptj):
    s = build_scheduler("vllm-fcfs", gptj, OnlineJobEstimator())
    seen = []
    s.on_admit = lambda decision, job: seen.append(decision)
    s.job_arrived("a", 0.0)
    s.segment_submitted("a", 0.0, 100, "qa")
    s.build_plan(1.0, {0: view()})
    assert [(d.job_id, d.score) for d in seen] == [("a", None)]


@pytest.mark.parametrize("wait", [True, False])
def test_new_jobs_wait_behind_a_job_under_way_that_does_not_fit(gptj, wait):
    """Job u comes back from its tool with its KV on the host: it needs 8 blocks, 4 are free.
    With `mlfq.new_jobs_wait_for_blocked` a new 2-block job does not take those 4 blocks
    before it (another job under way still may); without, the new job goes in."""
    # No copy is free here: w's few tokens stay on the GPU, and no reserve stops the fill.
    config = SchedulerConfig().with_overrides({
        "kv.watermark": "0", "mlfq.new_jobs_wait_for_blocked": str(wait).lower(),
        "kv.free_copy_step_share": "0"})
    s = build_scheduler("astraea", gptj, OnlineJobEstimator(), config)
    for job_id, tokens in (("u", 100), ("w", 8)):
        running_job(s, job_id, tokens=tokens)
    assert s.segment_ended("u", 2.0, 10, 100, True, "qa", view(free=1, total=50)).action \
        is KvAction.SWAP
    assert s.segment_ended("w", 2.0, 4, 8, True, "qa", view(free=10, total=50)).action \
        is KvAction.PRESERVE  # 12 tokens in one block, kept on the GPU
    s.segment_submitted("u", 3.0, 5)  # 115 tokens from the host: 8 blocks
    s.segment_submitted("w", 3.5, 2)  # 14 tokens: no new block
    s.job_arrived("n", 3.5)
    s.segment_submitted("n", 3.5, 32)  # 2 blocks
    v = view(free=4, total=50, running=1)
    admitted = [a.job_id for a in s.build_plan(4.0, {0: v}) if isinstance(a, Admit)]
    assert admitted == (["w"] if wait else ["w", "n"])
    assert s.jobs["u"].state is JobState.READY
