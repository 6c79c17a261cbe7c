"""Tensor/pipeline parallel settings of the vLLM worker, without starting an engine.

* The `astraea-worker` flags reach vLLM's `EngineArgs` (worker/process.py → EngineConfig →
  worker/vllm/config.py), and bad values are refused with a message naming the flag.
* The Swap action addresses every rank's shard: `HostSwap` (worker/vllm/swap.py) over two
  ranks, each a real `KvSwapExtension` holding its half of every layer's KV heads, as vLLM's
  tensor-parallel workers do. The executor's `collective_rpc` is stood in for by a loop over
  the ranks (vLLM's executors run the method on each worker and return the answers in rank
  order); the scheduler's block table by a dict.

A live TP=2 engine on the CPU build is in tests/test_vllm_tp_live.py.
"""

from __future__ import annotations

import importlib.util
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from worker.backend import EngineError  # noqa: E402
from worker.options import build_parser, make_backend  # noqa: E402
from worker.vllm.config import EXTENSION, EngineConfig, engine_args  # noqa: E402
from worker.vllm.ext import KvSwapExtension  # noqa: E402
from worker.vllm.swap import HostSwap  # noqa: E402

NUM_BLOCKS, KV_HEADS, BLOCK, HEAD = 8, 4, 2, 3
LAYERS = 2


# --- flags → EngineConfig → EngineArgs ------------------------------------------------------


def test_parallel_flags_reach_engine_args(tmp_path):
    args = build_parser().parse_args([
        "--backend", "vllm", "--model", str(tmp_path), "--tensor-parallel-size", "4",
        "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp"])
    config = make_backend(args).config
    assert (config.tensor_parallel_size, config.pipeline_parallel_size,
            config.distributed_executor_backend) == (4, 2, "mp")
    vllm_args = engine_args(config)
    assert (vllm_args.tensor_parallel_size, vllm_args.pipeline_parallel_size,
            vllm_args.distributed_executor_backend) == (4, 2, "mp")
    # Every rank gets the swap extension, whatever the executor.
    assert vllm_args.worker_extension_cls == EXTENSION


def test_one_rank_by_default(tmp_path):
    config = make_backend(build_parser().parse_args(
        ["--backend", "vllm", "--model", str(tmp_path)])).config
    vllm_args = engine_args(config)
    # None leaves the executor to vLLM: its own process for one rank, "mp" for more.
    assert (vllm_args.tensor_parallel_size, vllm_args.pipeline_parallel_size,
            vllm_args.distributed_executor_backend) == (1, 1, None)


@pytest.mark.parametrize("flag,value,message", [
    ("--tensor-parallel-size", "0", "must be at least 1, got 0"),
    ("--pipeline-parallel-size", "-2", "must be at least 1, got -2"),
    ("--tensor-parallel-size", "two", "'two' is not an integer"),
    ("--distributed-executor-backend", "uni", "invalid choice: 'uni'"),
])
def test_bad_parallel_flags_are_refused(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--backend", "vllm", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err


@pytest.mark.parametrize("field,value", [
    ("tensor_parallel_size", 0), ("pipeline_parallel_size", -1),
    ("tensor_parallel_size", 1.5), ("pipeline_parallel_size", True)])
def test_engine_config_refuses_sizes_that_are_not_positive_ints(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        EngineConfig(model="m", **{field: value})


def test_engine_config_refuses_an_unknown_executor():
    with pytest.raises(ValueError, match="one of mp, ray, got 'uni'"):
        EngineConfig(model="m", distributed_executor_backend="uni")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
def test_ray_without_ray_installed_is_a_clear_error(tmp_path):
    args = build_parser().parse_args([
        "--backend", "vllm", "--model", str(tmp_path), "--tensor-parallel-size", "2",
        "--distributed-executor-backend", "ray"])
    # `astraea-worker` logs this ValueError as "cannot start" and exits with code 2.
    with pytest.raises(ValueError, match=r"ray executor needs Ray, which is not installed"):
        make_backend(args)


# --- the Swap action over two tensor-parallel ranks -----------------------------------------


class Rank(KvSwapExtension):
    """The extension on one rank: its half of the KV heads of every layer."""

    def __init__(self, rank: int, ranks: int) -> None:
        heads = KV_HEADS // ranks
        self.model_runner = types.SimpleNamespace(
            kv_caches=[torch.randn(NUM_BLOCKS, heads, BLOCK, 2 * HEAD) + 10 * rank
                       for _ in range(LAYERS)],
            kv_cache_config=types.SimpleNamespace(num_blocks=NUM_BLOCKS))
        self.vllm_config = types.SimpleNamespace(
            cache_config=types.SimpleNamespace(num_gpu_blocks=NUM_BLOCKS))


class Core:
    """vLLM's EngineCore as HostSwap uses it: `collective_rpc` over every rank, in rank
    order, and the one scheduler's block table."""

    def __init__(self, ranks: list[Rank]) -> None:
        self.ranks = ranks
        self.calls: list[str] = []
        self.table: dict[str, list[int]] = {}
        self.free = list(range(NUM_BLOCKS - 1, 0, -1))
        kvm = types.SimpleNamespace(
            get_block_ids=lambda rid: (self.table[rid],),
            allocate_slots=self._allocate, free=lambda req: None)
        self.scheduler = types.SimpleNamespace(kv_cache_manager=kvm,
                                               needs_kv_cache_zeroing=False)

    def _allocate(self, request, tokens: int):
        self.table[request.request_id] = [self.free.pop() for _ in range(-(-tokens // BLOCK))]
        return self.table[request.request_id]

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(method)
        return [getattr(rank, method)(*args) for rank in self.ranks]


@pytest.fixture
def tp2():
    ranks = [Rank(0, 2), Rank(1, 2)]
    core = Core(ranks)
    return core, ranks, HostSwap(core, BLOCK, capacity_blocks=16)


def blocks(rank: Rank, block_ids: list[int]) -> list[torch.Tensor]:
    return [layer[block_ids].clone() for layer in rank.model_runner.kv_caches]


def test_block_bytes_count_every_rank(tp2):
    _, ranks, swap = tp2
    per_rank = LAYERS * (KV_HEADS // 2) * BLOCK * 2 * HEAD * 4  # float32
    assert [r.kv_block_bytes() for r in ranks] == [per_rank, per_rank]
    assert swap.block_bytes == 2 * per_rank  # what one swapped block costs the host


def test_swap_round_trip_restores_each_ranks_own_shard(tp2):
    core, ranks, swap = tp2
    core.table["job#0"] = [2, 5, 3]
    before = [blocks(r, [2, 5, 3]) for r in ranks]
    swap.copy_out("job", "job#0", computed_tokens=5)  # 3 blocks of 2 tokens
    assert [r.kv_swap_held() for r in ranks] == [{"job": 3}, {"job": 3}]
    assert swap.held_by_worker() == 3 == swap.used_blocks
    for r in ranks:  # the freed blocks are reused by someone else
        r.kv_blocks_fill([2, 5, 3], -1.0)

    request = types.SimpleNamespace(request_id="job#1", num_computed_tokens=0)
    swap.copy_in("job", request)
    new = core.table["job#1"]
    assert len(new) == 3 and request.num_computed_tokens == 5
    for r, was in zip(ranks, before):
        got = blocks(r, new)
        assert all(torch.equal(g, w) for g, w in zip(got, was))
    assert [r.kv_swap_held() for r in ranks] == [{}, {}]
    assert swap.held_by_worker() == 0


def test_ranks_holding_different_copies_is_an_error(tp2):
    core, ranks, swap = tp2
    core.table["job#0"] = [1, 2]
    swap.copy_out("job", "job#0", computed_tokens=4)
    ranks[1].kv_swap_drop("job")  # one rank lost its shard
    with pytest.raises(EngineError, match="ranks hold different host copies"):
        swap.held_by_worker()


def test_a_swap_out_one_rank_refuses_leaves_no_half_copy(tp2):
    core, ranks, swap = tp2
    core.table["job#0"] = [1, 2]
    ranks[1]._swap_store()["job"] = []  # rank 1 already holds the key: it refuses
    with pytest.raises(KeyError, match="already held"):
        swap.copy_out("job", "job#0", computed_tokens=4)
    assert core.calls[-1] == "kv_swap_drop"
    assert [r.kv_swap_held() for r in ranks[:1]] == [{}]  # rank 0's copy dropped
    assert swap.used_blocks == 0


def test_pipeline_stages_each_copy_their_own_layers():
    """PP: each rank holds some of the layers (here one of two), same block ids."""
    ranks = [Rank(0, 1), Rank(1, 1)]
    for r in ranks:
        r.model_runner.kv_caches = r.model_runner.kv_caches[:1]
    core = Core(ranks)
    swap = HostSwap(core, BLOCK, capacity_blocks=16)
    assert swap.block_bytes == 2 * KV_HEADS * BLOCK * 2 * HEAD * 4
    core.table["job#0"] = [4]
    before = [blocks(r, [4]) for r in ranks]
    swap.copy_out("job", "job#0", computed_tokens=1)
    request = types.SimpleNamespace(request_id="job#1", num_computed_tokens=0)
    swap.copy_in("job", request)
    for r, was in zip(ranks, before):
        assert torch.equal(blocks(r, core.table["job#1"])[0], was[0])
