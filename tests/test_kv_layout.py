"""PagedKV writes by slot: the one-index path (``planes``, where a plane's blocks lie back to
back) lands exactly where indexing by block and offset lands, in every FLASH_ATTN layout
ucm reads, and is taken only where the blocks do lie back to back."""

from __future__ import annotations

import pytest
import torch

from ucm.engine.kv_layout import flash_attn_view, token_slots

HEADS, DIM, BS, NUM_BLOCKS = 2, 8, 4, 6


def _cache(layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if layout == "planes":  # vLLM 0.32: [2, blocks, block, heads, dim]
        return torch.randn(2, NUM_BLOCKS, BS, HEADS, DIM, generator=g)
    if layout == "blocks_first":  # [blocks, 2, block, heads, dim]
        return torch.randn(NUM_BLOCKS, 2, BS, HEADS, DIM, generator=g)
    physical = torch.randn(NUM_BLOCKS, BS, HEADS, 2 * DIM, generator=g)  # vLLM 0.26, NHD stride order
    if layout == "packed_nhd":
        return physical.transpose(1, 2)  # logical [blocks, heads, block, 2 * dim]
    return torch.randn(NUM_BLOCKS, HEADS, BS, 2 * DIM, generator=g)  # packed, HND: contiguous


@pytest.mark.parametrize("layout,one_index", [("planes", True), ("packed_nhd", True), ("packed_hnd", False),
                                              ("blocks_first", False)])
def test_slot_writes_land_where_block_offset_writes_land(layout, one_index):
    base = _cache(layout)
    fast_cache, slow_cache = base.clone(), base.clone()  # clone() keeps the physical order
    assert fast_cache.stride() == base.stride()
    fast, slow = flash_attn_view(fast_cache, HEADS, DIM), flash_attn_view(slow_cache, HEADS, DIM)
    assert (fast.planes is not None) == one_index
    slow.planes = None
    g = torch.Generator().manual_seed(1)
    table = torch.randperm(NUM_BLOCKS, generator=g)
    slots = token_slots(table, torch.tensor([1, 2, 3, 5, 9, 14, 15]), BS)
    k, v = torch.randn(2, slots.shape[0], HEADS, DIM, generator=g).unbind(0)
    fast.scatter_at(fast.locate(slots), k, v)
    slow.scatter_at(slow.locate(slots), k, v)
    assert torch.equal(fast_cache, slow_cache)
    assert not torch.equal(fast_cache, base)
    got_k, got_v = fast.gather(slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    if one_index:
        assert fast.layout_key != slow.layout_key  # located slots are never shared between the two
