"""The vLLM engine wrapper (worker/vllm/engine.py) on the tiny model, with greedy decoding.

One engine serves the whole module (start-up is seconds). Each test starts from an empty,
cold pool and must leave it that way (the `clean_pool` fixture checks).

Why token-exact comparisons are sound here: a resumed job and its reference run the same
tokens through different batch shapes, which moves logprobs by float rounding only, about
1e-6 nats (measured in the vLLM spike, docs/vllm-spike). Greedy decoding can flip only where
the top two logprobs are closer than that, so `reference` checks that every greedy margin
(top-1 minus top-2, from `logprobs=2`) of the reference run is at least 1e-3 nats.
"""

from __future__ import annotations

import importlib
import math

import pytest

pytest.importorskip("vllm")

from tokenizers import Tokenizer  # noqa: E402

from astraea.plan import KvAction  # noqa: E402
from worker.backend import EngineError  # noqa: E402
from worker.vllm.engine import (  # noqa: E402
    EXTENSION,
    SCHEDULER,
    EngineConfig,
    JobKv,
    VllmEngine,
)
from worker.vllm.tiny_model import build_tiny_model  # noqa: E402

N, M = 24, 16  # tokens of segment 1 and of segment 2
BLOCK = 32
NUM_BLOCKS = 64  # 63 usable
PROMPT = "Question: what is the total cost of the order? Thought: I should ask the shop tool."
TOOL_RESULT = " Observation: the order costs sixty, with ten for the train. Thought: so"
MIN_MARGIN = 1e-3  # nats; rounding between batch shapes is ~1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VllmEngine(EngineConfig(model=str(model_dir), num_blocks=NUM_BLOCKS,
                                  block_size=BLOCK, host_swap_blocks=8))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(PROMPT).ids, tok.encode(TOOL_RESULT, add_special_tokens=False).ids


@pytest.fixture(autouse=True)
def clean_pool(engine):
    engine.reset_prefix_cache()  # no help from blocks cached by an earlier test
    yield
    leftover = engine.job_ids()
    for job in leftover:  # so that one failing test does not fail the ones after it
        engine.abort(job)
    while engine.has_work():  # let vLLM retire aborted requests
        engine.step()
    assert not leftover, "a test did not abort its jobs"
    check_memory(engine, host=0)
    mem = engine.memory()
    assert (mem.used_blocks, mem.running_seqs, mem.preserved_seqs) == (0, 0, 0)


# --- helpers --------------------------------------------------------------------------------


def check_memory(engine: VllmEngine, host: int) -> None:
    """The engine's report against the pool itself and against the worker's host copies."""
    mem = engine.memory()
    pool = engine.core.scheduler.kv_cache_manager.block_pool
    free = sum(1 for b in pool.blocks if b.ref_cnt == 0 and not b.is_null)
    assert mem.total_blocks == NUM_BLOCKS - 1
    assert mem.free_blocks == free
    assert mem.host_swap_blocks_used == engine.host_blocks_held() == host


def run_segment(engine: VllmEngine, job: str, steps: int = 500):
    """Step until `job`'s segment ends: (its tokens, its EngineSegmentEnded, its logprob rows)."""
    tokens, rows = [], []
    for _ in range(steps):
        result = engine.step()
        tokens += result.tokens.get(job, ())
        rows += result.logprobs.get(job, ())
        for end in result.ended:
            if end.job_id == job:
                return tokens, end, rows
    raise AssertionError(f"{job} did not finish")


def blocks_for(tokens: int) -> int:
    return math.ceil(tokens / BLOCK)


@pytest.fixture(scope="module")
def reference(engine, prompts):
    """Segment 1 (P -> out1), then segment 2 (T -> out2) continued at once, no pause; and a
    fresh job given the concatenated prompt P + out1 + T, which must agree."""
    P, T = prompts
    engine.reset_prefix_cache()
    engine.admit("ref", P, N, logprobs=2)
    out1, end1, rows1 = run_segment(engine, "ref")
    engine.admit("ref", T, M, logprobs=2)
    out2, end2, rows2 = run_segment(engine, "ref")
    engine.abort("ref")
    engine.reset_prefix_cache()
    engine.admit("fresh", (), M, context_token_ids=P + out1 + T, logprobs=2)
    fresh, end3, rows3 = run_segment(engine, "fresh")
    engine.abort("fresh")

    assert (len(out1), len(out2)) == (N, M)  # no early EOS: the comparisons cover every token
    assert end3.prefill_tokens == len(P + out1 + T)
    margins = [top[0] - top[1] for top in rows1 + rows2 + rows3]
    assert len(margins) == N + 2 * M
    assert min(margins) >= MIN_MARGIN, "a near-tie: token-exact checks would be flaky"
    assert fresh == out2, "unmodified vLLM on the concatenated prompt disagrees"
    return out1, out2


# --- the three KV actions: token-exact, no recompute unless discarded --------------------------


def test_preserve_resumes_exactly_without_recompute(engine, prompts, reference):
    P, T = prompts
    out1_ref, out2_ref = reference
    engine.admit("job", P, N)
    out1, end1, _ = run_segment(engine, "job")
    assert end1.prefill_tokens == len(P)
    engine.pause("job", KvAction.PRESERVE)
    held = engine.block_ids("job")
    assert len(held) >= blocks_for(len(P) + N - 1)
    check_memory(engine, host=0)
    assert engine.memory().used_blocks == len(held) and engine.memory().preserved_seqs == 1

    engine.admit("job", T, M)
    out2, end2, _ = run_segment(engine, "job")
    assert (out1, out2) == (out1_ref, out2_ref)
    assert end2.prefill_tokens == 1 + len(T)  # the re-sent last token plus the tool result
    assert engine.block_ids("job")[:len(held)] == held  # the same blocks, kept
    check_memory(engine, host=0)
    engine.abort("job")


def test_discard_recomputes_everything(engine, prompts, reference):
    P, T = prompts
    out1_ref, out2_ref = reference
    engine.admit("job", P, N)
    out1, _, _ = run_segment(engine, "job")
    engine.pause("job", KvAction.DISCARD)
    assert engine.job_kv("job") is JobKv.DISCARDED
    check_memory(engine, host=0)
    assert engine.memory().used_blocks == 0

    engine.admit("job", T, M)
    out2, end2, _ = run_segment(engine, "job")
    assert (out1, out2) == (out1_ref, out2_ref)
    # The evicted blocks give no prefix-cache hit: the whole context is prefilled again.
    assert end2.prefill_tokens == len(P + out1 + T)
    engine.abort("job")


def test_swap_restores_from_the_host_copy_only(engine, prompts, reference):
    P, T = prompts
    out1_ref, out2_ref = reference
    engine.admit("job", P, N)
    out1, _, _ = run_segment(engine, "job")
    old = engine.block_ids("job")
    engine.pause("job", KvAction.SWAP)
    swapped = blocks_for(len(P) + N - 1)  # tokens with KV: the last sampled one has none
    check_memory(engine, host=swapped)
    assert engine.memory().used_blocks == 0
    # Overwrite the freed blocks, so whichever blocks the swap-in gets, only the host copy
    # can make the tokens right; a filler job takes some of them with its own KV meanwhile.
    engine.core.collective_rpc("kv_blocks_fill", args=(old, 123.0))
    engine.admit("filler", list(range(3, 3 + BLOCK * len(old))), 2)
    engine.step()
    filler = engine.block_ids("filler")

    engine.admit("job", T, M)
    new = engine.block_ids("job")
    assert len(new) == swapped and not set(new) & set(filler)
    check_memory(engine, host=0)
    assert engine.memory().used_blocks == len(filler) + swapped
    out2, end2, _ = run_segment(engine, "job")
    assert (out1, out2) == (out1_ref, out2_ref)
    assert end2.prefill_tokens == 1 + len(T)  # no recompute
    engine.abort("job")
    engine.abort("filler")


def test_scribbled_kv_changes_the_tokens(engine, prompts, reference):
    """Control for the swap test: the tokens do depend on the KV contents."""
    P, T = prompts
    _, out2_ref = reference
    engine.admit("job", P, N)
    run_segment(engine, "job")
    engine.pause("job", KvAction.SWAP)
    engine.admit("job", T, M)
    engine.core.collective_rpc("kv_blocks_fill", args=(engine.block_ids("job"), 0.5))
    out2, _, _ = run_segment(engine, "job")
    assert out2 != out2_ref
    engine.abort("job")


def test_preempt_swap_mid_segment_resumes_exactly(engine, prompts, reference):
    P, T = prompts
    out1_ref, out2_ref = reference
    k = 5
    engine.admit("job", T, M, context_token_ids=P + out1_ref)
    got = []
    while len(got) < k:
        got += engine.step().tokens.get("job", ())
    old = engine.block_ids("job")
    preemption = engine.preempt("job", KvAction.SWAP)
    assert (preemption.generated_tokens, preemption.action) == (k, KvAction.SWAP)
    check_memory(engine, host=blocks_for(len(P + out1_ref + T) + k - 1))
    assert engine.memory().used_blocks == 0
    engine.core.collective_rpc("kv_blocks_fill", args=(old, 123.0))

    engine.admit("job", (), M - k)
    rest, end, _ = run_segment(engine, "job")
    assert got + rest == out2_ref
    assert end.prefill_tokens == 1  # only the last generated token, which had no KV
    engine.abort("job")


def test_preempt_discard_mid_segment_recomputes(engine, prompts, reference):
    P, T = prompts
    out1_ref, out2_ref = reference
    engine.admit("job", T, M, context_token_ids=P + out1_ref)
    got = []
    while len(got) < 3:
        got += engine.step().tokens.get("job", ())
    assert engine.preempt("job", KvAction.DISCARD).generated_tokens == 3
    check_memory(engine, host=0)
    engine.admit("job", (), M - 3)
    rest, end, _ = run_segment(engine, "job")
    assert got + rest == out2_ref
    assert end.prefill_tokens == len(P + out1_ref + T) + 3
    engine.abort("job")


def test_step_timing_reports_the_prefill(engine, prompts):
    P, _ = prompts
    engine.admit("job", P, 2)
    first = engine.step()
    assert first.timing is not None
    assert first.timing.tokens == first.timing.context_tokens_read == len(P)
    assert first.timing.duration_s > 0
    second = engine.step()
    assert (second.timing.tokens, second.timing.context_tokens_read) == (1, len(P) + 1)
    engine.abort("job")


# --- bad actions raise EngineError and change nothing ----------------------------------------


def snapshot(engine: VllmEngine, jobs: list[str]):
    return engine.memory(), {j: (engine.job_kv(j), engine.block_ids(j)) for j in jobs}


def test_admit_of_a_running_job_is_refused(engine, prompts):
    P, _ = prompts
    engine.admit("job", P, 4)
    engine.step()
    before = snapshot(engine, ["job"])
    with pytest.raises(EngineError, match="already running"):
        engine.admit("job", [5, 6], 4)
    assert snapshot(engine, ["job"]) == before
    tokens, end, _ = run_segment(engine, "job")
    assert end.generated_tokens == 4  # carried on as if nothing happened
    engine.abort("job")


def _swapped_with_a_hog(engine, P, hog_running: bool) -> int:
    """`job` ran segment 1 and is swapped out; `hog` holds so many blocks that the swap-in
    does not fit. Returns the swap-in's blocks."""
    engine.admit("job", P, N)
    run_segment(engine, "job")
    engine.pause("job", KvAction.SWAP)
    swapped = blocks_for(len(P) + N - 1)
    hog_tokens = (NUM_BLOCKS - 1 - (swapped - 1)) * BLOCK - 8
    engine.admit("hog", [7 + i % 400 for i in range(hog_tokens)], 4)
    if hog_running:
        engine.step()  # its prefill; it keeps decoding
    else:
        run_segment(engine, "hog")  # a paused session holding its blocks
    assert engine.memory().free_blocks < swapped
    return swapped


def test_swap_in_without_room_waits_for_it_then_restores_exactly(engine, prompts, reference):
    """The control plane planned a swap-in with blocks vLLM has since given away: the
    admission waits (held, its blocks reported as taken) with every admission ranked behind
    it, and once room is made it restores from the host copy, with no recompute."""
    P, T = prompts
    _, out2_ref = reference
    swapped = _swapped_with_a_hog(engine, P, hog_running=True)
    engine.admit("job", T, M, priority=0.0)
    engine.admit("later", [5, 6, 7], 2, priority=1.0)  # it would fit, but ranks behind
    assert engine.job_kv("job") is engine.job_kv("later") is JobKv.HELD
    assert engine.memory().held_swap_in_blocks == swapped
    check_memory(engine, host=swapped)  # the host copy is still there

    result = engine.step()  # hog still decoding: wait, nothing handed back
    assert not result.preempted and engine.job_kv("job") is JobKv.HELD
    with pytest.raises(EngineError, match="already running"):
        engine.admit("job", T, M)  # already admitted

    run_segment(engine, "hog")
    engine.pause("hog", KvAction.DISCARD)  # what the control plane does to make room
    out2, end, _ = run_segment(engine, "job")
    assert out2 == out2_ref
    assert end.prefill_tokens == 1 + len(T)  # swapped in, not recomputed
    assert engine.job_kv("later") is not JobKv.HELD  # released right behind it
    check_memory(engine, host=0)
    for j in ("job", "hog", "later"):
        engine.abort(j)


def test_held_swap_in_is_handed_back_when_nothing_can_free_room(engine, prompts, reference):
    """With vLLM running nothing, no blocks will come free by themselves: the held swap-in
    comes back as preempted with its copy kept (SWAP), and admitted again it is exact."""
    P, T = prompts
    _, out2_ref = reference
    swapped = _swapped_with_a_hog(engine, P, hog_running=False)
    engine.admit("job", T, M)
    result = engine.step()
    assert [(p.job_id, p.generated_tokens, p.action, p.held) for p in result.preempted] == \
        [("job", 0, KvAction.SWAP, True)]
    assert engine.job_kv("job") is JobKv.SWAPPED
    assert engine.memory().held_swap_in_blocks == 0
    check_memory(engine, host=swapped)

    engine.pause("hog", KvAction.DISCARD)
    engine.admit("job", [], M)  # T was taken with the first admission
    assert engine.job_kv("job") is JobKv.RUNNING  # room now: no wait
    out2, end, _ = run_segment(engine, "job")
    assert out2 == out2_ref and end.prefill_tokens == 1 + len(T)
    for j in ("job", "hog"):
        engine.abort(j)


def test_preempting_a_held_swap_in_discards_its_copy(engine, prompts, reference):
    P, T = prompts
    _, out2_ref = reference
    _swapped_with_a_hog(engine, P, hog_running=True)
    engine.admit("job", T, M)
    assert engine.job_kv("job") is JobKv.HELD
    p = engine.preempt("job", KvAction.DISCARD)
    assert (p.generated_tokens, p.action) == (0, KvAction.DISCARD)
    assert engine.job_kv("job") is JobKv.DISCARDED
    check_memory(engine, host=0)
    engine.abort("hog")
    engine.admit("job", [], M)
    out2, end, _ = run_segment(engine, "job")
    assert out2 == out2_ref and end.prefill_tokens == len(P) + N + len(T)  # recomputed
    engine.abort("job")


def test_actions_on_unknown_or_wrong_state_jobs_are_refused(engine, prompts):
    P, _ = prompts
    before = snapshot(engine, [])
    with pytest.raises(EngineError, match="unknown job"):
        engine.pause("nobody", KvAction.SWAP)
    with pytest.raises(EngineError, match="unknown job"):
        engine.preempt("nobody", KvAction.DISCARD)
    engine.abort("nobody")  # a no-op
    assert snapshot(engine, []) == before

    engine.admit("job", P, 3)
    engine.step()
    before = snapshot(engine, ["job"])
    with pytest.raises(EngineError, match="segment is running"):
        engine.pause("job", KvAction.SWAP)
    with pytest.raises(EngineError, match="cannot be preserved"):
        engine.preempt("job", KvAction.PRESERVE)
    assert snapshot(engine, ["job"]) == before
    run_segment(engine, "job")
    before = snapshot(engine, ["job"])
    with pytest.raises(EngineError, match="no segment running"):
        engine.preempt("job", KvAction.SWAP)
    with pytest.raises(EngineError, match="max_model_len"):
        engine.admit("job", [5] * 4000, 4)
    assert snapshot(engine, ["job"]) == before
    engine.abort("job")


def test_vllm_preemption_becomes_a_discard(engine):
    """Two jobs that cannot both fit: vLLM preempts the lower-priority one (higher value,
    scheduler.py:797) by itself; the engine ends it and reports a DISCARD preemption."""
    prompt_tokens, max_tokens = 31 * BLOCK - 8, 64  # each needs 33 of the 63 blocks
    engine.admit("a", [5 + i % 300 for i in range(prompt_tokens)], max_tokens, priority=0)
    engine.admit("b", [9 + i % 300 for i in range(prompt_tokens)], max_tokens, priority=1)
    preempted, generated = [], {"a": 0, "b": 0}
    while not preempted:
        result = engine.step()
        preempted += result.preempted
        for job, tokens in result.tokens.items():
            generated[job] += len(tokens)
        check_memory(engine, host=0)
    assert [(p.job_id, p.action) for p in preempted] == [("b", KvAction.DISCARD)]
    assert preempted[0].generated_tokens == generated["b"] > 0
    assert engine.job_kv("b") is JobKv.DISCARDED and engine.block_ids("b") == []
    # Ended in vLLM too: not waiting to be recomputed behind our back.
    assert engine.core.scheduler.get_request_counts() == (1, 0)
    _, end_a, _ = run_segment(engine, "a")
    assert end_a.generated_tokens == max_tokens
    engine.abort("a")
    engine.admit("b", (), max_tokens - generated["b"])  # resumed by us: a full recompute
    _, end_b, _ = run_segment(engine, "b")
    assert end_b.prefill_tokens == prompt_tokens + generated["b"]
    engine.abort("b")


def test_without_a_block_count_vllm_sizes_the_pool_from_memory(model_dir):
    """What a GPU worker does by default (`astraea-worker --backend vllm` without
    --kv-blocks): the pool comes from memory (here VLLM_CPU_KVCACHE_SPACE, 1 GiB) and the
    window is the model's own."""
    eng = VllmEngine(EngineConfig(model=str(model_dir), num_blocks=None, dtype="auto"))
    try:
        assert eng.max_model_len == 2048  # the tiny model's max_position_embeddings
        assert eng.memory().total_blocks == (1 << 30) // eng.block_bytes - 1
        eng.admit("j", [5, 6, 7, 8], 4)
        while eng.has_work():
            eng.step()
        assert eng.job_kv("j") is JobKv.PRESERVED
        eng.abort("j")
    finally:
        eng.close()


@pytest.mark.parametrize("path", [EXTENSION, SCHEDULER])
def test_the_classes_vllm_loads_by_name_exist(path):
    module, _, name = path.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type)
