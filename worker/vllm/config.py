"""What a vLLM engine is built from: `EngineConfig`, and the vLLM 0.32 `EngineArgs` it becomes.

A model larger than one GPU runs on vLLM's own executors: `tensor_parallel_size` splits each
layer's heads over that many ranks, `pipeline_parallel_size` splits the layers into that many
stages, and `distributed_executor_backend` picks how the ranks are started — "mp" (worker
processes on this node) or "ray" (a Ray cluster, across nodes). vLLM picks "mp" itself when
the ranks are more than one and no backend is named (config/parallel.py:1035). The engine core,
its scheduler and the block table stay in this process whatever the executor; only the model
ranks move, and the swap extension runs on each of them (`worker/vllm/ext.py`).

`engine_args` builds the arguments without starting anything, so the flags' way into vLLM
is testable on its own.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.vllm import sampling as to_vllm

if TYPE_CHECKING:
    from vllm.engine.arg_utils import EngineArgs

# What vLLM loads by name (tests/test_vllm_engine.py checks they resolve).
EXTENSION = "worker.vllm.ext.KvSwapExtension"
SCHEDULER = "worker.vllm.scheduler.RecordingScheduler"
EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a local Hugging Face model folder
    # KV pool size, including vLLM's null block (block 0). None: vLLM sizes it from memory
    # (gpu_memory_utilization of the GPU; VLLM_CPU_KVCACHE_SPACE GiB on CPU).
    num_blocks: int | None = 64
    block_size: int = 32  # the CPU attention backend needs a multiple of 32
    # Default: with num_blocks, what the pool can hold, at most 2048; without, the model's.
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9  # share of each GPU for weights and KV (vLLM's)
    max_num_seqs: int = 64  # counts paused (preserved) sessions too, scheduler.py:920
    max_num_batched_tokens: int = 2048
    host_swap_blocks: int = 256  # host memory for swapped blocks, in blocks (of all ranks)
    dtype: str = "float32"
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks each layer's heads are split over
    pipeline_parallel_size: int = 1  # stages the layers are split into
    distributed_executor_backend: str | None = None  # "mp", "ray"; None: vLLM's choice

    def __post_init__(self) -> None:
        check_parallel(self.tensor_parallel_size, self.pipeline_parallel_size,
                       self.distributed_executor_backend)


def check_parallel(tensor_parallel_size: int, pipeline_parallel_size: int,
                   backend: str | None) -> None:
    """Refuse parallel settings vLLM would fail on later, or less clearly (ValueError)."""
    for name, size in (("tensor_parallel_size", tensor_parallel_size),
                       ("pipeline_parallel_size", pipeline_parallel_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if backend is None:
        return
    if backend not in EXECUTOR_BACKENDS:
        raise ValueError(f"distributed executor backend must be one of "
                         f"{', '.join(EXECUTOR_BACKENDS)}, got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("the ray executor needs Ray, which is not installed here "
                         "(pip install 'ray[default]', then start or join a cluster with "
                         "`ray start`); on one node use mp")


def max_model_len_of(config: EngineConfig) -> int | None:
    """Block 0 is vLLM's null block, so a request can use num_blocks - 1 blocks at most;
    a larger max_model_len fails at start-up."""
    if config.max_model_len is None and config.num_blocks is not None:
        return min(2048, (config.num_blocks - 1) * config.block_size)
    return config.max_model_len


def engine_args(config: EngineConfig) -> EngineArgs:
    """vLLM's arguments for `config` (nothing is started)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=config.model, dtype=config.dtype, seed=config.seed,
        max_model_len=max_model_len_of(config), block_size=config.block_size,
        enforce_eager=True,
        num_gpu_blocks_override=config.num_blocks, enable_prefix_caching=True,
        gpu_memory_utilization=config.gpu_memory_utilization,
        scheduling_policy="priority", max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        # No step in flight while we move blocks between steps (the CPU build forces
        # this anyway, platforms/cpu.py:331). With pipeline stages this also means one
        # batch in the pipeline at a time: the engine calls EngineCore.step, not its
        # batch queue.
        async_scheduling=False,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        worker_extension_cls=EXTENSION,
        scheduler_cls=SCHEDULER, structured_outputs_config=dict(to_vllm.STRUCTURED_OUTPUTS))
