"""The engine side of the Swap action: which of a job's vLLM blocks go to host memory and
back, and how much host room the copies leave.

`VllmEngine` keeps one `HostSwap`. A swap-out copies the blocks that hold the job's computed
tokens, after which the engine frees them; a swap-in gives a new request fresh blocks from
vLLM's `allocate_slots`, copies the host copy into them and marks their tokens computed, so
the scheduler prefills only the rest. The tensor copies run inside vLLM's workers
(`worker/vllm/ext.py`), called over `collective_rpc` with block ids, never tensors.

With tensor or pipeline parallelism there is one worker per rank, each holding its shard of
every block (TP: its heads of each layer; PP: its stage's layers). `collective_rpc` runs a
method on every rank, so each copies its own shard to its own host memory and back; the
block ids are the same on every rank, because there is one scheduler and one block table
(in this process). Every call here checks that all ranks answered alike.

Runs on the engine's thread, like every `VllmEngine` call.
"""

from __future__ import annotations

import math

from worker.backend import EngineError


class HostSwap:
    """Jobs' KV copies in host memory: job → (tokens, blocks) copied, within a fixed number
    of host blocks."""

    def __init__(self, core, block_size: int, capacity_blocks: int) -> None:
        self._core = core  # vLLM's EngineCore
        self._sched = core.scheduler
        self._kvm = core.scheduler.kv_cache_manager
        self._block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._copies: dict[str, tuple[int, int]] = {}
        # Bytes one block takes over all layers of all ranks: what a swapped block costs.
        self.block_bytes: int = sum(self._on_ranks("kv_block_bytes"))

    def _on_ranks(self, method: str, *args) -> list:
        """Run the extension's `method` on every rank; their answers, in rank order."""
        return self._core.collective_rpc(method, args=args)

    def blocks_of(self, job_id: str) -> int:
        """Host blocks the job's copy takes (0: no copy); a swap-in needs as many free."""
        return self._copies.get(job_id, (0, 0))[1]

    @property
    def used_blocks(self) -> int:
        return sum(blocks for _, blocks in self._copies.values())

    def held_by_worker(self) -> int:
        """Host blocks as vLLM's workers count their copies (a check on `used_blocks`);
        raises `EngineError` if the ranks hold different copies."""
        held = self._on_ranks("kv_swap_held")
        if any(h != held[0] for h in held[1:]):
            raise EngineError(f"ranks hold different host copies: {held}")
        return sum(held[0].values())

    def copy_out(self, job_id: str, rid: str, computed_tokens: int) -> None:
        """Copy the blocks of request `rid` that hold its `computed_tokens` to the host. The
        caller then frees the request's blocks. Raises `EngineError` if the host is full."""
        n_blocks = math.ceil(computed_tokens / self._block_size)
        room = self.capacity_blocks - self.used_blocks
        if n_blocks > room:
            raise EngineError(f"swap {job_id}: {n_blocks} blocks, {room} free on the host")
        # Only the blocks holding computed tokens: vLLM may have allocated one more ahead.
        block_ids = list(self._kvm.get_block_ids(rid)[0][:n_blocks])
        try:
            self._on_ranks("kv_swap_out", job_id, block_ids)
        except Exception:
            # Some ranks may have their shard copied already: no half-copies stay behind.
            if job_id not in self._copies:
                self._on_ranks("kv_swap_drop", job_id)
            raise
        self._copies[job_id] = (computed_tokens, n_blocks)

    def copy_in(self, job_id: str, request) -> None:
        """Give `request` (one vLLM has not seen yet) blocks for the copied tokens, copy the
        host copy into them, mark those tokens computed, and forget the copy. The caller
        then adds the request. Raises `EngineError` (nothing changed) if vLLM has no room."""
        tokens, _ = self._copies[job_id]
        # Blocks for tokens [0, tokens) of a new request (kv_cache_manager.py:371); full
        # blocks are hashed into the prefix cache.
        if self._kvm.allocate_slots(request, tokens) is None:
            raise EngineError(f"admit {job_id}: no room to swap in")
        if self._sched.needs_kv_cache_zeroing:
            # Blocks listed here are zeroed on the next step, which would wipe the copy.
            self._kvm.take_new_block_ids()
        block_ids = list(self._kvm.get_block_ids(request.request_id)[0])
        try:
            # Each rank checks the block count before it copies anything, so a refusal
            # comes from every rank alike and leaves every copy in place.
            self._on_ranks("kv_swap_in", job_id, block_ids)
        except Exception:
            self._kvm.free(request)
            raise
        # The scheduler sees computed tokens, queues the request with those that hold
        # blocks and prefills only the rest (scheduler.py:1086).
        request.num_computed_tokens = tokens
        del self._copies[job_id]

    def drop(self, job_id: str) -> None:
        """Forget the job's host copy (a Discard of it, or the job aborted)."""
        self._on_ranks("kv_swap_drop", job_id)
        self._copies.pop(job_id, None)
