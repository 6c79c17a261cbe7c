"""The simulated GPU engine: token counts, KV blocks, prefix cache, swaps and preemption.

The "simple" profile (conftest) has 16-token blocks, a 64-token step budget, steps of
10 ms + 0.1 ms/token + 1e-3 ms per context token read, and swaps of 1 ms per token.
"""

from __future__ import annotations

import pytest

from astraea.plan import KvAction
from worker.backend import EngineError
from worker.sim.engine import SimulatedEngine
from worker.sim.kv_blocks import BlockPool, OutOfBlocks

BS = 16


def blocks(tokens: int) -> int:
    return -(-tokens // BS)


def run(engine: SimulatedEngine, now: float = 0.0, max_steps: int = 10_000):
    """Step until nothing runs; returns (ended by job, preempted list, steps, time)."""
    ended, preempted, steps = {}, [], 0
    while engine.has_work(now) and steps < max_steps:
        dur, res = engine.start_step(now)
        preempted.extend(res.preempted)
        now += dur
        res = engine.finish_step(now)
        engine.complete_transfers(now)
        for e in res.ended:
            ended[e.job_id] = e
        steps += 1
    return ended, preempted, steps, now


# --- tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, max_tokens", [(10, 1), (100, 5), (64, 37), (200, 128)])
def test_a_segment_generates_exactly_max_tokens_and_prefills_its_prompt(simple_profile, prompt,
                                                                        max_tokens):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", prompt, 0, max_tokens, swap_in=False, now=0.0)
    ended, preempted, steps, _ = run(e)
    assert preempted == []
    assert ended["j"].generated_tokens == max_tokens
    assert ended["j"].prefill_tokens == prompt
    # Prefill in chunks of the 64-token budget (the last one samples token 1), then one
    # decode step per further token.
    assert steps == blocks_of_budget(prompt) + max_tokens - 1
    assert e.tokens_decoded == max_tokens - 1
    assert e.tokens_prefilled == prompt


def blocks_of_budget(tokens: int, budget: int = 64) -> int:
    return -(-tokens // budget)


def test_finished_segment_holds_kv_for_its_history_until_released(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    run(e)
    # History 110 tokens; the last sampled token has no KV yet: 109 positions → 7 blocks.
    assert e.held["j"] == (blocks(109), 110)
    assert e.pool.used == blocks(109)
    e.release("j")
    assert e.pool.used == 0
    assert "j" not in e.held


def test_step_time_follows_the_cost_model(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 40, 0, 3, False, 0.0)
    dur, _ = e.start_step(0.0)
    assert dur == pytest.approx((10 + 0.1 * 40) / 1e3)  # prefill 40, nothing read before
    e.finish_step(dur)
    dur2, _ = e.start_step(dur)
    # Decode of token 2: one token, reading the KV already stored (the 40 prompt tokens).
    assert dur2 == pytest.approx((10 + 0.1 * 1 + 1e-3 * 40) / 1e3)
    e.finish_step(dur + dur2)
    dur3, _ = e.start_step(dur + dur2)
    assert dur3 == pytest.approx((10 + 0.1 * 1 + 1e-3 * 41) / 1e3)  # one more stored


def test_continuous_batching_runs_two_segments_together(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("a", 30, 0, 4, False, 0.0)
    e.admit("b", 30, 0, 4, False, 0.0)
    ended, _, steps, _ = run(e)
    assert {k: v.generated_tokens for k, v in ended.items()} == {"a": 4, "b": 4}
    assert steps == 1 + 3  # both prefills fit one 64-token step


# --- resume after an API wait ---------------------------------------------------------------
def test_preserved_job_resumes_prefilling_only_its_new_tokens(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    run(e)
    e.pause("j", KvAction.PRESERVE, 1.0)
    assert e.pool.used == blocks(109)
    e.admit("j", 25, 110, 5, False, 2.0)
    ended, _, _, _ = run(e, now=2.0)
    assert ended["j"].prefill_tokens == 25
    assert ended["j"].generated_tokens == 5
    assert e.tokens_recomputed == 0
    assert e.held["j"] == (blocks(139), 140)


def test_resume_with_a_context_that_disagrees_with_the_worker_is_an_error(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    run(e)
    with pytest.raises(EngineError, match="j.*110"):
        e.admit("j", 5, 120, 5, False, 1.0)


@pytest.mark.parametrize("prompt, out", [(100, 10), (90, 6), (60, 4)])
def test_discarded_job_resumes_from_the_prefix_cache_when_memory_allows(simple_profile, prompt,
                                                                        out):
    """Only blocks completely filled with computed KV can be cached: the segment's history is
    prompt + out tokens, of which history − 1 have KV (the last sampled token has none)."""
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", prompt, 0, out, False, 0.0)
    run(e)
    history = prompt + out
    e.pause("j", KvAction.DISCARD, 1.0)
    assert e.pool.used == 0  # freed, but cached
    cached_full_blocks = (history - 1) // BS
    new = 20
    e.admit("j", new, history, 3, False, 2.0)
    ended, _, _, _ = run(e, now=2.0)
    assert ended["j"].prefill_tokens == history + new - cached_full_blocks * BS
    assert e.prefix_hit_tokens == cached_full_blocks * BS
    assert e.tokens_recomputed == history - cached_full_blocks * BS


def test_discarded_job_recomputes_everything_once_its_cache_was_evicted(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=10)
    e.admit("j", 100, 0, 10, False, 0.0)
    run(e)
    e.pause("j", KvAction.DISCARD, 1.0)
    # Another job takes all the memory, evicting j's cached blocks.
    e.admit("hog", 150, 0, 1, False, 1.0)
    run(e, now=1.0)
    e.release("hog")
    assert e.pool.cached_blocks("j") == 0
    e.admit("j", 20, 110, 3, False, 2.0)
    ended, _, _, _ = run(e, now=2.0)
    assert ended["j"].prefill_tokens == 130
    assert e.tokens_recomputed == 110


def test_a_finished_jobs_blocks_are_reused_by_others_through_the_cache(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=10)
    e.admit("a", 100, 0, 10, False, 0.0)
    run(e)
    e.release("a")
    assert e.pool.allocatable == 10
    e.admit("b", 150, 0, 1, False, 1.0)  # needs all 10 blocks
    ended, _, _, _ = run(e, now=1.0)
    assert ended["b"].generated_tokens == 1


# --- swapping -------------------------------------------------------------------------------
def test_swap_out_frees_gpu_blocks_only_when_the_copy_completes(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    _, _, _, t = run(e)
    held = blocks(109)
    e.pause("j", KvAction.SWAP, t)
    copy_s = 110 * 1e-3  # 110 tokens × 1000 B over 1e6 B/s
    assert simple_profile.swap_time_s(110) == pytest.approx(copy_s)
    assert e.host_used == held  # host space is reserved at once
    assert e.pool.used == held  # the GPU copy is still being read
    assert e.next_transfer_s() == pytest.approx(t + copy_s)
    assert e.view().swapping_out_blocks == held
    e.complete_transfers(t + copy_s * 0.99)
    assert e.pool.used == held
    e.complete_transfers(t + copy_s)
    assert e.pool.used == 0
    assert e.host_used == held
    assert e.view().swapping_out_blocks == 0


def test_swap_in_makes_the_segment_runnable_only_after_its_copy_lands(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    _, _, _, t = run(e)
    e.pause("j", KvAction.SWAP, t)
    e.complete_transfers(t + 1.0)
    host_blocks = e.host_used
    resume = t + 2.0
    e.admit("j", 20, 110, 4, swap_in=True, now=resume)
    lands = resume + 110 * 1e-3
    assert e.pool.used == blocks(130)  # GPU blocks are allocated for the incoming copy
    assert not e.has_work(resume)
    assert e.next_ready_s(resume) == pytest.approx(lands)
    dur, _ = e.start_step(resume)
    assert dur == 0.0  # nothing runnable yet
    assert not e.has_work(lands - 1e-6)
    assert e.has_work(lands)
    e.complete_transfers(lands - 1e-6)
    assert e.host_used == host_blocks  # host copy still being read
    e.complete_transfers(lands)
    assert e.host_used == 0  # freed once the copy landed
    ended, _, _, _ = run(e, now=lands)
    assert ended["j"].prefill_tokens == 20  # only the new tokens: the KV came back
    assert ended["j"].generated_tokens == 4
    assert e.tokens_swapped_in == 110 and e.tokens_swapped_out == 110


def test_swap_transfers_are_serialised_on_the_link(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("a", 50, 0, 2, False, 0.0)
    e.admit("b", 30, 0, 2, False, 0.0)
    _, _, _, t = run(e)
    e.pause("a", KvAction.SWAP, t)
    e.pause("b", KvAction.SWAP, t)
    done = sorted(tr.done_at for tr in e.transfers)
    assert done == pytest.approx([t + 52e-3, t + 52e-3 + 32e-3])


def test_a_job_swapped_in_before_its_swap_out_finished_keeps_its_gpu_blocks(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 100, 0, 10, False, 0.0)
    _, _, _, t = run(e)
    e.pause("j", KvAction.SWAP, t)
    e.admit("j", 5, 110, 2, swap_in=True, now=t + 0.01)  # copy still in flight
    assert e.host_used == 0
    assert e.transfers == []
    assert e.has_work(t + 0.01)  # no copy to wait for
    ended, _, _, _ = run(e, now=t + 0.01)
    assert ended["j"].prefill_tokens == 5
    assert e.tokens_recomputed == 0


def test_swap_out_beyond_host_capacity_is_refused(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.host_total = 3
    e.admit("j", 100, 0, 10, False, 0.0)
    run(e)
    with pytest.raises(EngineError, match="host swap space full"):
        e.pause("j", KvAction.SWAP, 1.0)
    assert e.host_used == 0 and "j" in e.held


# --- preemption -----------------------------------------------------------------------------
def test_out_of_blocks_during_decode_preempts_the_most_recently_admitted(simple_profile):
    # Two 16-token prompts fill one block each; the first decode step writes position 16 and
    # needs a new block for each. With 3 blocks only one can get it.
    e = SimulatedEngine(simple_profile, kv_blocks=3)
    e.admit("job-z", 16, 0, 8, False, 0.0)  # admitted first
    e.admit("job-a", 16, 0, 8, False, 0.0)  # admitted last: the victim
    dur, res = e.start_step(0.0)
    assert res.preempted == []
    e.finish_step(dur)
    dur2, res2 = e.start_step(dur)
    assert res2.preempted == [("job-a", 1)]  # it had sampled its first token
    assert list(e.running) == ["job-z"]
    assert e.preemptions == 1
    e.finish_step(dur + dur2)
    ended, _, _, _ = run(e, now=dur + dur2)
    assert ended["job-z"].generated_tokens == 8


def test_a_preempted_segment_resumed_later_decodes_all_its_remaining_tokens(simple_profile):
    """After a preemption the job's segment is admitted again (with the tokens it still has
    to generate); it must run for exactly that many tokens — whatever was scheduled for its
    earlier, preempted run must not end the new one."""
    e = SimulatedEngine(simple_profile, kv_blocks=3)
    e.admit("z", 16, 0, 8, False, 0.0)
    e.admit("a", 16, 0, 20, False, 0.0)
    now = 0.0
    dur, _ = e.start_step(now)
    now += dur
    e.finish_step(now)
    dur, res = e.start_step(now)
    assert res.preempted == [("a", 1)]
    now += dur
    e.finish_step(now)
    ended, _, _, now = run(e, now)  # z finishes alone
    assert set(ended) == {"z"}
    e.release("z")
    # a resumes from its 17 tokens of history (16 prompt + 1 generated), 19 still to come.
    e.admit("a", 0, 17, 19, False, now)
    ended, preempted, steps, _ = run(e, now)
    assert preempted == []
    assert ended["a"].generated_tokens == 19
    assert steps == 1 + 18  # one prefill step samples token 1, then 18 decode steps
    assert e.held["a"] == (blocks(17 + 19 - 1), 17 + 19)
    assert e.pool.used == blocks(17 + 19 - 1)


def test_preempt_action_swaps_a_decoding_segment_and_reports_its_tokens(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 40, 0, 20, False, 0.0)
    now = 0.0
    for _ in range(4):  # prefill (token 1) + 3 decode steps (tokens 2..4)
        dur, _ = e.start_step(now)
        now += dur
        e.finish_step(now)
    assert e.is_decoding("j")
    generated, action = e.preempt("j", KvAction.SWAP, now)
    assert (generated, action) == (4, KvAction.SWAP)
    assert "j" in e.swapped and "j" not in e.running
    # KV of 40 + 3 positions (the 4th token has none yet).
    assert e.swapped["j"] == (blocks(43), 44)


def test_preempt_of_a_prefilling_segment_discards_it(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=100)
    e.admit("j", 200, 0, 5, False, 0.0)  # 4 prefill steps of 64
    dur, _ = e.start_step(0.0)
    e.finish_step(dur)
    generated, action = e.preempt("j", KvAction.SWAP, dur)
    assert (generated, action) == (0, KvAction.DISCARD)
    assert e.pool.used == 0
    assert e.pool.cached_blocks("j") == 64 // BS  # the computed chunk stays cached


# --- plan errors ----------------------------------------------------------------------------
def test_engine_rejects_impossible_plans(simple_profile):
    e = SimulatedEngine(simple_profile, kv_blocks=4)
    with pytest.raises(EngineError, match="max_tokens"):
        e.admit("j", 10, 0, 0, False, 0.0)
    with pytest.raises(EngineError, match="needs 7 KV blocks"):
        e.admit("big", 100, 0, 1, False, 0.0)
    assert e.pool.used == 0
    e.admit("j", 10, 0, 5, False, 0.0)
    with pytest.raises(EngineError, match="already running"):
        e.admit("j", 10, 0, 5, False, 0.0)
    with pytest.raises(EngineError, match="not swapped out"):
        e.admit("k", 10, 30, 5, True, 0.0)
    with pytest.raises(EngineError, match="no paused KV"):
        e.pause("ghost", KvAction.DISCARD, 0.0)
    with pytest.raises(EngineError, match="not running"):
        e.preempt("ghost", KvAction.DISCARD, 0.0)
    e.start_step(0.0)
    with pytest.raises(EngineError, match="already running"):
        e.start_step(0.0)


# --- block pool -----------------------------------------------------------------------------
def test_block_pool_evicts_least_recently_cached_jobs_first():
    pool = BlockPool(10, BS)
    pool.allocate(4)
    pool.release_to_cache("old", 4, 64)
    pool.allocate(4)
    pool.release_to_cache("new", 4, 64)
    assert (pool.free, pool.cached_total, pool.used) == (2, 8, 0)
    pool.allocate(5)  # 2 free + 3 evicted from "old"
    assert pool.cached_blocks("old") == 1 and pool.cached_blocks("new") == 4
    assert pool.take_cached("new", 2) == 2  # needs only two: the rest is freed
    assert pool.cached_blocks("new") == 0
    assert pool.used == 5 + 2
    with pytest.raises(OutOfBlocks):
        pool.allocate(4)


def test_a_refused_admission_leaves_the_jobs_kv_where_it_was(simple_profile):
    """A plan the engine cannot carry out (no room, wrong context) changes nothing: the
    paused job's KV, the prefix cache and the free blocks are as before, and a valid
    admission afterwards still works."""
    e = SimulatedEngine(simple_profile, kv_blocks=20)
    e.admit("a", 100, 0, 5, False, 0.0)
    run(e)
    held_before = dict(e.held)
    free_before, cached_before = e.pool.free, e.pool.cached_total
    with pytest.raises(EngineError, match="holds 105 tokens"):
        e.admit("a", 10, 999, 5, False, 1.0)  # wrong context for the preserved job
    with pytest.raises(EngineError, match="needs"):
        e.admit("a", 400, 105, 5, False, 1.0)  # no room for the new tokens
    assert e.held == held_before
    assert (e.pool.free, e.pool.cached_total) == (free_before, cached_before)
    e.evict("a", KvAction.DISCARD, 1.0)
    cached = e.pool.cached_blocks("a")
    with pytest.raises(EngineError, match="needs"):
        e.admit("a", 500, 105, 5, False, 2.0)  # recompute would not fit either
    assert e.pool.cached_blocks("a") == cached  # the prefix cache kept the job's blocks
    e.admit("a", 10, 105, 5, False, 3.0)  # and a valid admission still works, hitting the cache
    ended, _, _, _ = run(e, now=3.0)
    assert ended["a"].generated_tokens == 5
    assert ended["a"].prefill_tokens == 105 + 10 - cached * BS
    assert e.pool.free + e.pool.cached_total + e.pool.used == e.pool.total
