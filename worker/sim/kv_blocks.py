"""KV block accounting of one simulated GPU: free blocks, and a prefix cache of freed blocks.

Like vLLM's block pool with prefix caching: blocks a finished or discarded request freed stay
cached (evictable) until somebody needs the memory; the least recently freed job's blocks go
first, its tail blocks before its head, so a prefix survives longest. A job that comes back
finds the head of its context still cached and recomputes only the rest.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total = total_blocks
        self.block_size = block_size
        self.free = total_blocks  # never used, or evicted from the cache
        self._cached: OrderedDict[str, int] = OrderedDict()  # job → evictable blocks (LRU first)
        self.cached_total = 0

    @property
    def allocatable(self) -> int:
        return self.free + self.cached_total

    @property
    def used(self) -> int:
        """Blocks holding live KV (not free, not merely cached)."""
        return self.total - self.free - self.cached_total

    def allocate(self, n: int) -> None:
        if n <= 0:
            return
        if n > self.allocatable:
            raise OutOfBlocks(f"need {n} blocks, {self.allocatable} allocatable")
        take = min(n, self.free)
        self.free -= take
        n -= take
        while n > 0:  # evict least recently cached, tail blocks first
            job, blocks = next(iter(self._cached.items()))
            drop = min(blocks, n)
            n -= drop
            self.cached_total -= drop
            if drop == blocks:
                del self._cached[job]
            else:
                self._cached[job] = blocks - drop

    def release(self, n: int) -> None:
        self.free += n
        if self.free + self.cached_total > self.total:
            raise AssertionError("block pool released more than it holds")

    def release_to_cache(self, job_id: str, blocks: int, context_tokens: int) -> None:
        """Free a job's blocks, keeping its full blocks cached under the job's prefix."""
        full = min(blocks, context_tokens // self.block_size)
        self.free += blocks - full
        self.drop_cached(job_id)
        if full:
            self._cached[job_id] = full
            self.cached_total += full

    def take_cached(self, job_id: str, max_blocks: int) -> int:
        """Reuse up to `max_blocks` cached head blocks of the job; returns how many."""
        blocks = self._cached.pop(job_id, 0)
        hit = min(blocks, max_blocks)
        self.cached_total -= blocks
        self.free += blocks - hit  # a cached tail beyond the needed prefix is just freed
        return hit

    def drop_cached(self, job_id: str) -> None:
        blocks = self._cached.pop(job_id, 0)
        self.cached_total -= blocks
        self.free += blocks

    def cached_blocks(self, job_id: str) -> int:
        return self._cached.get(job_id, 0)
