"""The swap extension's block addressing (worker/vllm/ext.py), on plain tensors.

The live engine tests cover the CPU build, where the attention kernel's block is the
scheduler's. Here a KV cache laid out in kernel blocks half the scheduler's size (as a GPU
kernel may be) checks that a swap moves whole scheduler blocks."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")

from worker.vllm.ext import KvSwapExtension, _by_scheduler_block  # noqa: E402

NUM_BLOCKS, K = 6, 2  # scheduler blocks, kernel blocks per scheduler block


def worker(kernel_blocks_per_block: int):
    """The extension mixed into a stand-in for vLLM's Worker: two layers of [B*k, H, N, C]."""
    w = KvSwapExtension()
    caches = [torch.arange(NUM_BLOCKS * kernel_blocks_per_block * 2 * 3 * 4, dtype=torch.float32)
              .reshape(NUM_BLOCKS * kernel_blocks_per_block, 2, 3, 4) * (layer + 1)
              for layer in range(2)]
    w.model_runner = types.SimpleNamespace(
        kv_caches=caches, kv_cache_config=types.SimpleNamespace(num_blocks=NUM_BLOCKS))
    w.vllm_config = types.SimpleNamespace(cache_config=types.SimpleNamespace(num_gpu_blocks=None))
    return w, caches


@pytest.mark.parametrize("k", [1, K])
def test_swap_moves_whole_scheduler_blocks(k):
    w, caches = worker(k)
    before = [c.clone() for c in caches]
    assert w.kv_block_bytes() == 2 * k * 2 * 3 * 4 * 4  # both layers, k kernel blocks each
    w.kv_swap_out("job", [1, 3])
    w.kv_blocks_fill([1, 3], 0.0)
    assert w.kv_swap_held() == {"job": 2}
    w.kv_swap_in("job", [5, 0])  # new blocks: the data lands there, in order
    for b, a in zip(caches, before):
        by_block, was = _by_scheduler_block(b, NUM_BLOCKS), _by_scheduler_block(a, NUM_BLOCKS)
        assert torch.equal(by_block[5], was[1]) and torch.equal(by_block[0], was[3])
        assert torch.equal(by_block[2], was[2]) and torch.equal(by_block[4], was[4])
        assert not by_block[1].any() and not by_block[3].any()  # filled, not swapped back
    assert w.kv_swap_held() == {}


def test_a_cache_that_does_not_divide_into_scheduler_blocks_is_refused():
    with pytest.raises(ValueError, match="do not divide"):
        _by_scheduler_block(torch.zeros(7, 1), NUM_BLOCKS)
