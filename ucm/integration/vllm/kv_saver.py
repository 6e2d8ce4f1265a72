"""Saves of one worker: KV blocks from the paged cache into the store.

After a forward, each block to save is gathered from the paged cache (every layer),
its K rotated back to the positions its key stands for (a chunk block computed at
position p is stored as if at 0), and dumped. On CUDA the request that produced the
KV does not wait for any of it: the device-to-host copy runs on a side stream into
pinned host blocks of the pool the store reserved at start, and the store insert runs
in a background thread; ``inflight.INFLIGHT`` makes a lookup in this process wait for
exactly the keys still being saved. On CPU the dump is synchronous (the copy is the
same work as the compute, on the same cores).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Any, Optional

import torch

from ucm.hashing import rank_key
from ucm.integration.vllm.inflight import INFLIGHT
from ucm.integration.vllm.kv_layout import PagedKV, token_slots
from ucm.integration.vllm.metadata import UcmConnectorMetadata
from ucm.sparse.blend.rope import RopeSpec, delta_rotate
from ucm.store import pinned
from ucm.store.base import KVStoreBase, StoreError, Task
from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

BLOCK_LAYOUT = "ucm-kv-v1:L,KV,T,H,D"
"""One stored block: ``[layers, K/V, block_tokens, kv_heads, head_dim]`` of one TP rank."""

STAGE_BLOCKS = 32
"""Blocks per pinned staging buffer (64 MiB of Llama-3-8B blocks), so a save issues one
device->host copy per 32 blocks. One copy per block (1,030 for a cold 8K prompt) filled
CUDA's queue of pending work, and the host then waited for the copies themselves:
128 ms of host time per request on an H100 (cProfile, ``ttft_gpu.py --host-profile-cold``)."""


class KVSaver:
    """Gathers, rotates back and dumps a step's blocks; counts saves and failures."""

    def __init__(self, store: KVStoreBase, block_tokens: int, tp_rank: int, rope: Optional[RopeSpec],
                 max_step_tokens: int = 0) -> None:
        self.store = store
        self.block_tokens = block_tokens
        self.max_step_tokens = max_step_tokens  # tokens one forward may save: the staging headroom
        self.tp_rank = tp_rank
        self.rope = rope
        self.block_nbytes = 0  # one stored block, set by reserve()
        self.saved_blocks = 0
        self.failed_saves = 0
        self.pending: list[Task] = []
        self._stream: Any = None
        self._pool: Optional[cf.ThreadPoolExecutor] = None

    def reserve(self, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> None:
        """Tell the store the size of our blocks and how many one step may stage."""
        self.block_nbytes = num_layers * 2 * self.block_tokens * num_kv_heads * head_dim * element_size
        self.store.reserve(self.block_nbytes, in_flight_blocks=self.max_step_tokens // self.block_tokens,
                           stage_blocks=STAGE_BLOCKS)

    def save(self, meta: UcmConnectorMetadata, views: dict[str, PagedKV], layer_names: list[str],
             vllm_block_size: int) -> None:
        """Dump every block ``meta`` asks to save; ``layer_names`` in layer order."""
        saves = [(req, s) for req in meta.requests.values() for s in req.saves]
        if not saves:
            return
        b = self.block_tokens
        device = views[layer_names[0]].k.device
        # Token indices of every saved block, [saves * b], built in one op (1,030 blocks
        # for a cold 8K prompt: per-block tensor ops cost ~20 ms of host time).
        starts = torch.tensor([s.token_start for _, s in saves], dtype=torch.long)
        tokens = (starts[:, None] + torch.arange(b)[None, :]).reshape(-1)
        slots = []
        i = 0
        while i < len(saves):  # saves are grouped by request: one slot lookup per request
            req = saves[i][0]
            j = i
            while j < len(saves) and saves[j][0] is req:
                j += 1
            table = torch.tensor(req.block_ids, dtype=torch.long)
            slots.append(token_slots(table, tokens[i * b:j * b], vllm_block_size))
            i = j
        slot = to_device(torch.cat(slots), device)
        delta = torch.tensor([-s.rope_delta for _, s in saves], dtype=torch.long).repeat_interleave(b)
        rotate = bool((delta != 0).any())
        if rotate:
            delta, tokens = to_device(delta, device), to_device(tokens, device)
        # [blocks, L, 2, b, H, D], written layer by layer: each block one contiguous piece.
        per_block: Optional[torch.Tensor] = None
        for i, name in enumerate(layer_names):
            k, v = views[name].gather(slot)
            if rotate:
                k = delta_rotate(k, delta, self.rope, from_positions=tokens)
            if per_block is None:
                per_block = torch.empty((len(saves), len(layer_names), 2, b) + tuple(v.shape[1:]),
                                        dtype=v.dtype, device=v.device)
            per_block[:, i, 0] = k.view(len(saves), b, *k.shape[1:])
            per_block[:, i, 1] = v.view(len(saves), b, *v.shape[1:])
        assert per_block is not None
        if per_block[0].nbytes != self.block_nbytes:  # the store reserved blocks of another size
            raise RuntimeError(f"ucm: saved blocks have {per_block[0].nbytes} bytes, "
                               f"{self.block_nbytes} were reserved")
        keys = [rank_key(s.key, self.tp_rank) for _, s in saves]
        self.saved_blocks += len(saves)
        if per_block.is_cuda:
            self.pending.append(self._dump_when_copied(keys, per_block))
        else:
            self.pending.append(self.store.dump(keys, list(per_block.unbind(0)), BLOCK_LAYOUT))

    def _dump_when_copied(self, keys: list[bytes], per_block: torch.Tensor) -> Task:
        """Copy blocks to pinned host memory on a side stream and dump them from a
        background thread once the copy has landed.

        Nothing here waits for the GPU: the request that produced the KV gets its first
        token without paying for the device-to-host copy or the store's insert. A block
        becomes visible to lookups a little later (a request in between recomputes it,
        which is always correct); :meth:`reap` with ``wait=True`` flushes.
        """
        device = per_block.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucm-save")
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        # Pinned staging buffers of STAGE_BLOCKS blocks from the pool the store reserved
        # (always full-size, so every save reuses the same cached size): one copy each. A
        # single buffer for the whole save (1 GiB at 8K tokens) would be a fresh page-lock
        # of that size whenever the previous one is still being dumped.
        n = per_block.shape[0]
        host: list[torch.Tensor] = []
        with torch.cuda.stream(stream):
            for start in range(0, n, STAGE_BLOCKS):
                count = min(STAGE_BLOCKS, n - start)
                buffer = pinned.empty((STAGE_BLOCKS,) + tuple(per_block.shape[1:]), per_block.dtype)[:count]
                buffer.copy_(per_block[start:start + count], non_blocking=True)
                host.extend(buffer.unbind(0))  # per-block views keep the buffer until dumped
            per_block.record_stream(stream)  # keep the device buffer until the copy ran
            copied = torch.cuda.Event()
            copied.record(stream)

        def dump() -> Any:
            copied.synchronize()
            return self.store.wait(self.store.dump(keys, host, BLOCK_LAYOUT))

        assert self._pool is not None
        future = self._pool.submit(dump)
        INFLIGHT.add(keys, future)
        return Task([future], lambda results: results[0], f"dump of {len(keys)} blocks")

    def reap(self, wait: bool = False) -> None:
        """Collect finished dumps; a failed dump is a future miss, logged, never fatal."""
        still = []
        for task in self.pending:
            if wait or task.done():
                try:
                    self.store.wait(task)
                except StoreError as err:
                    self.failed_saves += 1
                    logger.warning("ucm: saving KV blocks failed: %s", err)
            else:
                still.append(task)
        self.pending = still
