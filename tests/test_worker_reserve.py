"""WorkerSide asks its store to reserve memory for exactly the blocks it will save."""

from __future__ import annotations

import torch

from ucm.engine.kv_saver import STAGE_BLOCKS
from ucm.engine.worker_side import LayerInfo, WorkerSide
from ucm.store.dram_store import UcmDramStore


class RecordingStore(UcmDramStore):
    def __init__(self) -> None:
        super().__init__(capacity_bytes=1 << 20)
        self.reserved: list[tuple[int, int]] = []

    def reserve(self, block_nbytes: int, in_flight_blocks: int = 0, stage_blocks: int = 1) -> None:
        self.reserved.append((block_nbytes, in_flight_blocks, stage_blocks))
        super().reserve(block_nbytes, in_flight_blocks, stage_blocks)


def test_register_reserves_one_block_size_and_a_step_of_staging():
    heads, dim, layers, vllm_block, block_tokens = 2, 8, 3, 16, 4
    store = RecordingStore()
    worker = WorkerSide(store, block_tokens=block_tokens, tp_rank=0, rope=None, first_check_layer=None,
                        max_step_tokens=64)
    # vLLM 0.32 FLASH_ATTN layout: [2, blocks, block_size, heads, head_dim], float32.
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, 5, vllm_block, heads, dim) for i in range(layers)}
    infos = [LayerInfo(name, i, "FLASH_ATTN", heads, dim) for i, name in enumerate(caches)]
    worker.register(caches, infos)
    # One stored block: [L, 2, block_tokens, H, D] float32; 64 tokens a step = 16 blocks.
    assert store.reserved == [(layers * 2 * block_tokens * heads * dim * 4, 64 // block_tokens, STAGE_BLOCKS)]
