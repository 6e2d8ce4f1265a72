"""Saves of one worker: KV blocks from the paged cache into the store.

After a forward, each block to save is gathered from the paged cache (every layer, in
one Triton launch on CUDA: ``kv_load.read_layers``), its K rotated back to the positions
its key stands for (a chunk block computed at position p is stored as if at 0), and
dumped. On CUDA the request that produced the
KV does not wait for any of it: a background thread copies the blocks to the host on a
side stream -- straight into slots the store lends (the DRAM tier's pinned arena), else
into pinned staging buffers -- and then inserts them; ``inflight.INFLIGHT`` makes a
lookup in this process wait for exactly the keys still being saved. On CPU the gather
runs on the request path (the copy is the same work as the compute, on the same cores),
straight into the slots the store lends when they form one run (else one copy per run),
and the dump is handed to the store at once; a store that writes in threads of its own (the file store)
registers the keys in ``INFLIGHT`` too, until its task is done.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from ucm.hashing import rank_key
from ucm.engine.inflight import INFLIGHT
from ucm.engine.kv_layout import PagedKV, request_slots
from ucm.engine.kv_load import read_layers
from ucm.engine.step_meta import StepPlan
from ucm.sparse.blend.rope import RopeSpec
from ucm.store import pinned
from ucm.store.arena import coalesce_runs
from ucm.store.base import KVStoreBase, StoreError, Task
from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

BLOCK_LAYOUT = "ucm-kv-v1:L,KV,T,H,D"
"""One stored block: ``[layers, K/V, block_tokens, kv_heads, head_dim]`` of one TP rank."""

STAGE_BLOCKS = 32
"""Blocks per device->host copy (64 MiB of Llama-3-8B blocks). One copy per block (1,030
for a cold 8K prompt) filled CUDA's queue of pending work, and the host then waited for
the copies themselves: 128 ms of host time per request on an H100 (cProfile,
``ttft_gpu.py --host-profile-cold``)."""

COPIES_QUEUED = 1
"""Device->host copies of a save queued on the stream at a time (see ``_copy_to_host``).

One: the copy engine let the step's own small device->host copy (the sampled tokens) wait
behind every piece of a save as long as the next piece was already queued -- 38.9 ms for a
cold 8K prompt on an H100 with two queued (torch.profiler trace, ``ttft_gpu.py --trace``).
With one, the engine is idle for a moment between pieces and serves that copy first."""


class KVSaver:
    """Gathers, rotates back and dumps a step's blocks; counts saves and failures."""

    def __init__(self, store: KVStoreBase, block_tokens: int, tp_rank: int, rope: Optional[RopeSpec],
                 max_step_tokens: int = 0, copies_queued: int = COPIES_QUEUED) -> None:
        self.store = store
        self.copies_queued = copies_queued  # device -> host copies queued at a time (CUDA)
        self.block_tokens = block_tokens
        self.max_step_tokens = max_step_tokens  # tokens one forward may save: the staging headroom
        self.tp_rank = tp_rank
        self.rope = rope
        self.block_shape: tuple[int, ...] = ()  # [L, 2, block_tokens, H, D], set by reserve()
        self.element_size = 0  # bytes per element of a stored block, set by reserve()
        self.saved_blocks = 0
        self.failed_saves = 0
        self.pending: list[Task] = []
        self._stream: Any = None
        self._pool: Optional[cf.ThreadPoolExecutor] = None

    def reserve(self, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> None:
        """Tell the store the size of our blocks and how many one step may stage."""
        self.block_shape = (num_layers, 2, self.block_tokens, num_kv_heads, head_dim)
        self.element_size = element_size
        self.store.reserve(self.block_nbytes, in_flight_blocks=self.max_step_tokens // self.block_tokens,
                           stage_blocks=STAGE_BLOCKS)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one stored block (0 before :meth:`reserve`)."""
        return math.prod(self.block_shape) * self.element_size if self.block_shape else 0

    def save(self, meta: StepPlan, views: dict[str, PagedKV], layer_names: list[str],
             vllm_block_size: int) -> None:
        """Dump every block ``meta`` asks to save; ``layer_names`` in layer order."""
        saves = [(req, s) for req in meta.requests.values() for s in req.saves]
        if not saves:
            return
        b = self.block_tokens
        device = views[layer_names[0]].k.device
        # The [4, saves * b] rows (kv_load.ROWS) in numpy (torch's CPU ops go through the
        # OpenMP pool, which stalled requests for tens of ms on an H100 host; see
        # WorkerSide._indices): block row, slot, prompt position, and the delta to the
        # position the stored key stands at. Tokens of all blocks in one op (1,030 blocks
        # for a cold 8K prompt: per-block tensor ops cost ~20 ms of host time).
        n = len(saves)
        rows = np.empty((4, n * b), dtype=np.int64)
        rows[0] = np.arange(n * b)
        tokens = (np.fromiter((s.token_start for _, s in saves), np.int64, n)[:, None] + np.arange(b)).reshape(-1)
        rows[2] = tokens
        rows[3] = np.repeat(np.fromiter((s.rope_delta for _, s in saves), np.int64, n), b)
        rows[1] = request_slots([req for req, _ in saves], np.full(n, b), tokens, vllm_block_size)
        rotate = bool((rows[3] != 0).any())
        rows_dev = to_device(torch.from_numpy(rows), device)
        if not self.block_shape or self.block_shape[0] != len(layer_names):
            raise RuntimeError(f"ucm: saving {len(layer_names)} layers, blocks of shape {self.block_shape} "
                               "were reserved")
        dtype = views[layer_names[0]].k.dtype
        if math.prod(self.block_shape) * dtype.itemsize != self.block_nbytes:  # reserved for another dtype
            raise RuntimeError(f"ucm: saved blocks have {math.prod(self.block_shape) * dtype.itemsize} bytes, "
                               f"{self.block_nbytes} were reserved")
        layer_views = [views[name] for name in layer_names]
        keys = [rank_key(s.key, self.tp_rank) for _, s in saves]
        self.saved_blocks += len(saves)
        if device.type == "cuda":
            per_block = torch.empty((n,) + self.block_shape, dtype=dtype, device=device)
            read_layers(per_block, layer_views, rows_dev, self.rope, rotate)
            self.pending.append(self._dump_when_copied(keys, per_block))
        else:
            task = self._dump_on_host(keys, layer_views, rows_dev, rotate, dtype)
            INFLIGHT.add(keys, task)  # the store may still be writing (the file store's I/O threads)
            self.pending.append(task)

    def _dump_on_host(self, keys: list[bytes], layer_views: list[PagedKV], rows: torch.Tensor, rotate: bool,
                      dtype: torch.dtype) -> Task:
        """CPU: gather straight into slots the store lends when they form one run (fresh
        arena slots do), else gather and copy once per run of slots; the dump adopts them.
        A store that lends none gets the gathered blocks to copy itself.

        Why: on CPU the save runs on the request's path, and a dump block by block (a copy,
        a slot and an insert each) cost a cold 4K-token prompt of a tiny model ~100 ms on
        the 2-core VM.
        """
        n = len(keys)
        lent = self.store.lend_blocks(n, self.block_shape, dtype)
        try:
            runs = coalesce_runs(lent) if lent is not None else []
            if len(runs) == 1:
                read_layers(runs[0][2], layer_views, rows, self.rope, rotate)
            else:
                per_block = torch.empty((n,) + self.block_shape, dtype=dtype)
                read_layers(per_block, layer_views, rows, self.rope, rotate)
                if lent is None:
                    return self.store.dump(keys, list(per_block.unbind(0)), BLOCK_LAYOUT)
                for first, count, run in runs:
                    run.copy_(per_block[first:first + count])
        except BaseException:
            if lent is not None:
                self.store.return_blocks(lent)
            raise
        return self.store.dump(keys, lent, BLOCK_LAYOUT)

    def _dump_when_copied(self, keys: list[bytes], per_block: torch.Tensor) -> Task:
        """Copy blocks to pinned host memory on a side stream and dump them, all from a
        background thread.

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
        # The gather ran on the compute stream. An event, waited on right before this
        # save's first copy: a stream.wait_stream here would also hold back the pieces of
        # an earlier save the thread has not issued yet, behind this step's forward.
        gathered = torch.cuda.Event()
        gathered.record(torch.cuda.current_stream(device))
        per_block.record_stream(stream)
        device_blocks = [per_block]  # the thread's only reference, dropped once copied

        def copy_and_dump() -> Any:
            blocks = device_blocks.pop()
            # Lending runs here (evictions and a view per block: 1,030 for a cold 8K prompt).
            lent = self.store.lend_blocks(len(keys), tuple(blocks.shape[1:]), blocks.dtype)
            try:
                stream.wait_event(gathered)
                host = self._copy_to_host(blocks, lent, stream, self.copies_queued)
                del blocks  # copies landed: free the device memory before slower tiers write
                return self.store.wait(self.store.dump(keys, host, BLOCK_LAYOUT))
            except BaseException:
                if lent is not None:
                    stream.synchronize()  # no copy may still be writing a slot handed back
                    self.store.return_blocks(lent)  # a no-op for blocks the dump adopted
                raise

        assert self._pool is not None
        future = self._pool.submit(copy_and_dump)
        INFLIGHT.add(keys, future)
        return Task([future], lambda results: results[0], f"dump of {len(keys)} blocks")

    @staticmethod
    def _copy_to_host(per_block: torch.Tensor, lent: Optional[list[torch.Tensor]], stream: Any,
                      copies_queued: int) -> list[torch.Tensor]:
        """Copy ``per_block`` ([blocks, ...]) to the host, piece by piece
        (:func:`host_targets`), with at most ``copies_queued`` pieces queued at a time;
        returns one host tensor per block.

        Why so few at a time: copies queued ahead (2 GiB for a cold 8K-token prompt) delay
        every later device-to-host copy -- the step's sampled tokens too.
        """
        host, pieces = host_targets(per_block.shape[0], tuple(per_block.shape[1:]), per_block.dtype, lent)
        queued: list[torch.cuda.Event] = []
        with torch.cuda.stream(stream):
            for dst, first in pieces:
                dst.copy_(per_block[first:first + dst.shape[0]], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                queued.append(event)
                if len(queued) >= copies_queued:
                    queued.pop(0).synchronize()
        for event in queued:
            event.synchronize()
        return host

    def reap(self, wait: bool = False) -> None:
        """Collect finished dumps; a failed dump is a future miss, logged, never fatal."""
        if not self.pending:
            return
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


def host_targets(n: int, shape: tuple[int, ...], dtype: torch.dtype, lent: Optional[list[torch.Tensor]]
                 ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
    """Where ``n`` saved blocks of ``shape`` go on the host: one tensor per block, and the
    copy pieces ``(destination [count, *shape], first block)`` of at most STAGE_BLOCKS.

    Into ``lent`` store blocks (of ``shape``) when given, a piece per run of blocks lying
    back to back (consecutive arena slots); else into pinned staging buffers of
    STAGE_BLOCKS blocks, always full-size so that every save reuses the same cached
    pinned size.
    """
    pieces: list[tuple[torch.Tensor, int]] = []
    if lent is not None:
        if len(lent) != n:
            raise ValueError(f"ucm: {len(lent)} lent blocks for {n} saved blocks")
        host = list(lent)
        for first, count, run in coalesce_runs(host):
            pieces += [(run[k:k + STAGE_BLOCKS], first + k) for k in range(0, count, STAGE_BLOCKS)]
        return host, pieces
    host = []
    for first in range(0, n, STAGE_BLOCKS):
        count = min(STAGE_BLOCKS, n - first)
        buffer = pinned.empty((STAGE_BLOCKS,) + shape, dtype)[:count]
        host.extend(buffer.unbind(0))  # per-block views keep the buffer until dumped
        pieces.append((buffer, first))
    return host, pieces
