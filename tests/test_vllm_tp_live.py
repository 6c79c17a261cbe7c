"""LIVE, SLOW (a minute or two per engine): real parallel engines with vLLM's mp executor on
the CPU build and the tiny model: TP=2 (2 KV heads: one per rank) and PP=2 (2 layers: one
per stage).

What a user of `--tensor-parallel-size` relies on: a swapped job comes back from the host
copy on EVERY rank. Each rank's own shard is checked (its checksum over the job's blocks
before the swap-out and after the swap-in, in fresh blocks), the freed blocks are
overwritten before the swap-in so only the host copies can restore them, and the resumed
job's tokens equal those of the same job preserved instead.

vLLM's CPU build binds each rank's threads to its own CPUs (VLLM_CPU_OMP_THREADS_BIND, one
list per rank; its automatic binding wants a NUMA node per rank), so the test needs two CPUs.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from astraea.plan import KvAction  # noqa: E402
from worker.vllm.engine import EngineConfig, VllmEngine  # noqa: E402
from worker.vllm.tiny_model import build_tiny_model  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
PROMPT = list(range(5, 45))  # 40 tokens: two blocks of 32
TOOL_RESULT = [7, 8, 9]
N = 8


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def engine(request):
    tp, pp = request.param
    if len(CPUS) < 2:
        pytest.skip("vLLM's CPU build binds each of the 2 ranks to its own CPU; one CPU here")
    import vllm.envs

    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{CPUS[0]}|{CPUS[1]}"
    # An engine built earlier in this process froze vLLM's environment: read it again.
    vllm.envs.disable_envs_cache()
    eng = VllmEngine(EngineConfig(model=str(build_tiny_model()), num_blocks=16,
                                  tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                  distributed_executor_backend="mp"))
    try:
        yield eng
    finally:
        eng.close()
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
        vllm.envs.disable_envs_cache()


def segment(engine: VllmEngine, job: str) -> list[int]:
    out: list[int] = []
    for _ in range(200):
        step = engine.step()
        out += step.tokens.get(job, ())
        if any(e.job_id == job for e in step.ended):
            return out
    raise AssertionError(f"{job}: segment did not end")


def test_two_ranks_each_hold_half_of_a_block(engine):
    """TP: half of each layer's heads; PP: one of the two layers."""
    per_rank = engine.core.collective_rpc("kv_block_bytes")
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert engine.block_bytes == sum(per_rank)


def test_swap_restores_every_ranks_shard(engine):
    engine.admit("kept", PROMPT, N)
    kept1 = segment(engine, "kept")
    engine.admit("kept", TOOL_RESULT, N)
    kept2 = segment(engine, "kept")
    engine.abort("kept")

    engine.admit("job", PROMPT, N)
    assert segment(engine, "job") == kept1
    old = engine.block_ids("job")[:2]  # the blocks holding the prompt's 40 tokens
    before = engine.core.collective_rpc("kv_blocks_checksum", args=(old,))
    assert len(before) == 2 and before[0] != before[1]  # each rank its own heads / layer

    engine.pause("job", KvAction.SWAP)
    assert engine.core.collective_rpc("kv_swap_held") == [{"job": 2}, {"job": 2}]
    assert engine.host_blocks_held() == engine.memory().host_swap_blocks_used == 2
    engine.core.collective_rpc("kv_blocks_fill", args=(old, 123.0))

    engine.admit("job", TOOL_RESULT, N)
    new = engine.block_ids("job")[:2]
    assert engine.core.collective_rpc("kv_blocks_checksum", args=(new,)) == before
    assert engine.core.collective_rpc("kv_swap_held") == [{}, {}]
    assert segment(engine, "job") == kept2
    engine.abort("job")
