"""vLLM worker extension: copy a job's KV blocks to host memory and back (the Swap action).

vLLM 0.32's v1 engine has no swap of its own. `worker/vllm/engine.py` passes this class as
`EngineArgs(worker_extension_cls="worker.vllm.ext.KvSwapExtension")`; vLLM mixes it into its
Worker class (vllm/v1/worker/worker_base.py:296), so these methods run where the KV cache
lives and are called with `EngineCore.collective_rpc("kv_swap_out", args=(...))` (the engine's
side of a swap: `worker/vllm/swap.py`).

The host copies stay inside the worker, keyed by job: only block and byte counts cross the
`collective_rpc` boundary, never tensors (which a multi-process executor would pickle).
With tensor or pipeline parallelism vLLM runs one Worker per rank and `collective_rpc`
calls each of them, so every rank copies its own shard (TP: its KV heads of each layer; PP:
its stage's layers) to its own host tensors. Nothing here depends on the rank: the block
ids come from the one scheduler, and every rank's caches are indexed by them.

KV layout in 0.32: `model_runner.kv_caches` holds one tensor per layer, each the logical
view [block, kv_heads, block_size, C] indexed on dim 0 by the *scheduler's* block ids
(allocate_kv_cache, vllm/v1/worker/utils.py:564; bind_kv_cache, :811). So a swap is an
`index_select` / `index_copy_` on dim 0 whatever the physical strides. An attention kernel
with a smaller block than the scheduler's sees each scheduler block as k consecutive kernel
blocks on dim 0; the copies then move whole scheduler blocks (`_by_scheduler_block`, as vLLM's
own block copy does, v1/worker/utils.py:934). Verified on the CPU build only (k = 1; K and V
packed in C = 2 * head_size, cpu_attn.py:364).

One more thing only the worker can do: seed the sampler of a resumed session. vLLM gives a
request its seeded generator when it first sees it and keeps it across session updates
(`_update_streaming_request`, v1/worker/gpu_model_runner.py:1591), so a preserved job's next
segment would ignore its own seed (`session_seed`).
"""

from __future__ import annotations

import torch


class KvSwapExtension:
    """Methods mixed into vLLM's Worker; `self.model_runner` is the worker's model runner."""

    def _swap_store(self) -> dict[str, list[torch.Tensor]]:
        # Created lazily: the mixin cannot hook the Worker's __init__.
        store = getattr(self, "_astraea_swap_store", None)
        if store is None:
            store = self._astraea_swap_store = {}
        return store

    def _block_index(self, block_ids: list[int]) -> torch.Tensor:
        device = self.model_runner.kv_caches[0].device
        return torch.tensor(block_ids, dtype=torch.long, device=device)

    def _caches(self) -> list[torch.Tensor]:
        """Each layer's KV cache viewed with dim 0 = the scheduler's blocks."""
        config = getattr(self.model_runner, "kv_cache_config", None)  # set with the cache
        num_blocks = getattr(config, "num_blocks", None) or \
            self.vllm_config.cache_config.num_gpu_blocks
        return [_by_scheduler_block(t, num_blocks) for t in self.model_runner.kv_caches]

    def kv_block_bytes(self) -> int:
        """Bytes one block takes over all layers (what a swapped block costs on the host)."""
        return sum(t[0].numel() * t.element_size() for t in self._caches())

    def kv_swap_out(self, key: str, block_ids: list[int]) -> int:
        """Copy `block_ids` of every layer to host tensors held under `key`; bytes copied."""
        store = self._swap_store()
        if key in store:
            raise KeyError(f"swap key {key!r} already held")
        caches = self._caches()
        idx = self._block_index(block_ids)
        on_gpu = caches[0].device.type == "cuda"
        copies = []
        for layer in caches:
            host = torch.empty((len(block_ids), *layer.shape[1:]), dtype=layer.dtype,
                               device="cpu", pin_memory=on_gpu)
            host.copy_(layer.index_select(0, idx), non_blocking=on_gpu)
            copies.append(host)
        if on_gpu:  # the copies must be complete before the blocks are handed to others
            torch.cuda.current_stream().synchronize()
        store[key] = copies
        return sum(c.numel() * c.element_size() for c in copies)

    def kv_swap_in(self, key: str, block_ids: list[int]) -> int:
        """Copy the host tensors under `key` into `block_ids` and drop them; blocks copied."""
        store = self._swap_store()
        copies = store[key]
        if len(block_ids) != copies[0].shape[0]:
            raise ValueError(f"{key}: {copies[0].shape[0]} blocks held, {len(block_ids)} given")
        caches = self._caches()
        idx = self._block_index(block_ids)
        for layer, host in zip(caches, copies):
            layer.index_copy_(0, idx, host.to(layer.device, non_blocking=True))
        if caches[0].device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        del store[key]
        return len(block_ids)

    def kv_swap_drop(self, key: str) -> bool:
        """Forget the host copy under `key`; whether there was one."""
        return self._swap_store().pop(key, None) is not None

    def kv_swap_held(self) -> dict[str, int]:
        """Blocks held on the host, by key."""
        return {key: copies[0].shape[0] for key, copies in self._swap_store().items()}

    def kv_blocks_fill(self, block_ids: list[int], value: float) -> None:
        """Overwrite blocks with `value` (tests: prove a swap-in does not read old blocks)."""
        idx = self._block_index(block_ids)
        for layer in self._caches():
            layer.index_fill_(0, idx, value)

    def kv_blocks_checksum(self, block_ids: list[int]) -> float:
        """Sum of |x| over the blocks of every layer (tests: compare copies)."""
        idx = self._block_index(block_ids)
        return float(sum(t.index_select(0, idx).double().abs().sum()
                         for t in self._caches()))

    def pp_stage_buffers(self) -> bool:
        """Allocate the buffer a later pipeline stage receives its input into, if vLLM has not;
        whether this did. vLLM allocates it in a dummy forward pass at start-up, which its CPU
        runner skips in eager mode (`warming_up_model`, v1/worker/cpu_model_runner.py:85), so
        the first step of a later stage would fail (v1/worker/gpu_model_runner.py:3174)."""
        from vllm.distributed.parallel_state import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
            return False
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype,
            device=runner.device)
        return True

    def session_seed(self, req_id: str, seed: int | None) -> bool:
        """Give a session's next segment the generator vLLM gives a new request with `seed`
        (None: no own generator). False if the model runner does not know the request."""
        state = self.model_runner.requests.get(req_id)
        if state is None:
            return False
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model_runner.device)
            generator.manual_seed(seed)
        state.generator = generator
        return True


def _by_scheduler_block(cache: torch.Tensor, num_blocks: int | None) -> torch.Tensor:
    """`cache` with dim 0 counting scheduler blocks: a view of k kernel blocks per scheduler
    block when the kernel's blocks are smaller (k = 1: `cache` itself)."""
    if not num_blocks:
        return cache
    k, rest = divmod(cache.shape[0], num_blocks)
    if rest or k < 1:
        raise ValueError(f"{cache.shape[0]} cache blocks do not divide into {num_blocks} "
                         "scheduler blocks")
    return cache if k == 1 else cache.unflatten(0, (num_blocks, k))
