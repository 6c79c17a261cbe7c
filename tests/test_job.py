"""The job state machine: legal transitions, the bookkeeping they do, and illegal events."""

from __future__ import annotations

import pytest

from astraea.plan import JobState, KvAction, KvState
from control_plane.core.job import IllegalTransition, Job


def ready_job(now: float = 0.0, tokens: int = 100) -> Job:
    job = Job("j1", arrival_s=now)
    job.mark_ready(now, tokens)
    return job


def test_new_job_is_arrived_without_kv_at_level_zero():
    job = Job("j1", arrival_s=1.5)
    assert job.state is JobState.ARRIVED
    assert job.kv_state is KvState.NONE
    assert job.level == 0
    assert job.context_tokens == 0


def test_full_lifecycle_with_one_tool_call_tracks_tokens_and_states():
    job = Job("j1", arrival_s=0.0)
    job.mark_ready(0.0, 100)
    assert (job.state, job.pending_tokens) == (JobState.READY, 100)

    job.mark_running(2.0, worker_id=3)
    assert job.state is JobState.RUNNING
    assert job.worker_id == 3
    assert job.kv_state is KvState.RESIDENT

    job.mark_segment_end(5.0, generated_tokens=40, calls_tool=True)
    assert job.state is JobState.API_WAIT
    assert job.api_start_s == 5.0
    assert job.context_tokens == 140  # prompt + output
    assert job.pending_tokens == 0
    assert job.segment_index == 1

    job.mark_ready(7.0, 25)  # the tool returned 25 tokens
    assert job.state is JobState.READY
    assert job.pending_tokens == 25
    job.mark_running(7.5, worker_id=3)
    job.mark_segment_end(9.0, generated_tokens=10, calls_tool=False)
    assert job.state is JobState.FINISHED
    assert job.finished_s == 9.0
    assert job.context_tokens == 100 + 40 + 25 + 10
    assert job.segment_index == 2


def test_waiting_time_counts_ready_time_only_not_running_or_api_time():
    job = ready_job(now=1.0)
    job.mark_running(4.0, 0)  # waited 3 s
    assert job.waiting_s == pytest.approx(3.0)
    assert job.waiting_now(100.0) == pytest.approx(3.0)  # running: no wait accrues
    job.mark_segment_end(6.0, 10, calls_tool=True)
    assert job.waiting_now(50.0) == pytest.approx(3.0)  # API time is not waiting
    job.mark_ready(50.0, 5)
    assert job.waiting_now(52.5) == pytest.approx(5.5)  # 3 s before + 2.5 s now


def test_preemption_keeps_generated_tokens_and_requires_recompute():
    job = ready_job(tokens=100)
    job.mark_running(1.0, 0)
    job.mark_preempted(2.0, generated_tokens=7)
    assert job.state is JobState.READY
    assert job.kv_state is KvState.DISCARDED
    assert job.context_tokens == 107
    assert job.pending_tokens == 0
    assert job.ready_since_s == 2.0
    assert job.tokens_to_prefill == 107
    assert job.segment_index == 0  # still the same segment


@pytest.mark.parametrize(
    "action, kv_state",
    [(KvAction.PRESERVE, KvState.RESIDENT), (KvAction.SWAP, KvState.SWAPPED),
     (KvAction.DISCARD, KvState.DISCARDED)],
)
def test_kv_action_during_api_wait_sets_kv_state_and_keeps_worker_affinity(action, kv_state):
    job = ready_job()
    job.mark_running(1.0, worker_id=2)
    job.mark_segment_end(2.0, 5, calls_tool=True)
    job.apply_kv_action(action)
    assert job.kv_state is kv_state
    assert job.worker_id == 2


def test_prefill_needs_depend_on_where_the_kv_is():
    job = ready_job(tokens=100)
    job.mark_running(1.0, 0)
    job.mark_segment_end(2.0, 20, calls_tool=True)
    job.mark_ready(3.0, 30)
    assert job.kv_state is KvState.RESIDENT
    assert job.tokens_to_prefill == 30
    job.apply_kv_action(KvAction.SWAP)
    assert job.tokens_to_prefill == 30  # swapped back in, not recomputed
    job.apply_kv_action(KvAction.DISCARD)
    assert job.tokens_to_prefill == 150


@pytest.mark.parametrize(
    "setup, event",
    [
        ("arrived", lambda j: j.mark_running(1.0, 0)),
        ("arrived", lambda j: j.mark_segment_end(1.0, 1, False)),
        ("arrived", lambda j: j.mark_preempted(1.0, 0)),
        ("ready", lambda j: j.mark_ready(1.0, 5)),
        ("ready", lambda j: j.mark_segment_end(1.0, 1, True)),
        ("running", lambda j: j.mark_running(1.0, 0)),
        ("running", lambda j: j.mark_ready(1.0, 5)),
        ("running", lambda j: j.apply_kv_action(KvAction.SWAP)),
        ("finished", lambda j: j.mark_ready(1.0, 5)),
        ("finished", lambda j: j.mark_running(1.0, 0)),
    ],
)
def test_events_in_the_wrong_state_raise_illegal_transition_naming_job_and_states(setup, event):
    job = Job("job-42", arrival_s=0.0)
    if setup in ("ready", "running", "finished"):
        job.mark_ready(0.0, 10)
    if setup in ("running", "finished"):
        job.mark_running(0.0, 0)
    if setup == "finished":
        job.mark_segment_end(0.5, 3, calls_tool=False)
    before = (job.state, job.context_tokens, job.pending_tokens, job.kv_state)
    with pytest.raises(IllegalTransition) as info:
        event(job)
    msg = str(info.value)
    assert "job-42" in msg
    assert job.state.value in msg  # the state it was in
    # A refused event changes nothing.
    assert (job.state, job.context_tokens, job.pending_tokens, job.kv_state) == before
