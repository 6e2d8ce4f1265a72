"""Host buffers a file-tier load reads into: one per load, pinned within a budget.

Why a module of its own: where the bytes of a read land decides how a loader can move
them to the GPU (one asynchronous copy per run of blocks from pinned memory, or one
blocking copy per block from pageable memory), and that is a policy of host memory,
not of the file format or the store's index.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional, Tuple

import torch

from ucm.store import pinned
from ucm.store.block_format import Allocator, new_tensor, tensor_bytes

logger = logging.getLogger(__name__)


class ReadSlab:
    """One host buffer for all blocks of a load call, in key order.

    Why: blocks read into tensors of their own reach the GPU with one copy each, and
    from pageable memory synchronously (thousands of small blocking copies per 8K-token
    prompt, which made the file tier slower than recomputing). Back to back in one
    buffer -- pinned where CUDA is available, within the store's budget
    (:class:`PinnedReads`) -- a chunk's blocks form one run that a loader moves with one
    asynchronous copy (:func:`ucm.store.arena.coalesce_runs`).
    The buffer is sized from the first header read; a block of another shape or dtype
    gets a tensor of its own. It lives as long as any block read into it; pinned buffers come
    from torch's caching host allocator, so later loads of a similar size reuse them.
    """

    def __init__(self, count: int, host_buffer: Callable[[int], torch.Tensor]) -> None:
        self.count = count
        self._host_buffer = host_buffer
        self._lock = threading.Lock()
        self._blocks: Tuple[torch.Tensor, ...] = ()  # one view per slot, made in one call
        self._bytes: Optional[memoryview] = None
        self._kind: Optional[tuple] = None  # (shape, dtype) of the slots

    def allocator(self, index: int) -> Allocator:
        """Where block ``index`` of the call is read into.

        The slots' tensors and bytes are made once, by the first block read (one
        ``unbind`` and one buffer view): per-block torch calls from 8-16 I/O threads
        capped a 2 MiB-block load at ~6 GB/s on the H100 host, against ~16 GB/s for the
        same reads and checksums without them.
        """

        def take(shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[torch.Tensor, memoryview]:
            nbytes = dtype.itemsize
            for dim in shape:
                nbytes *= dim
            with self._lock:
                if self._kind is None and nbytes:
                    # Made whole before any field is set: a failure leaves the slab unset
                    # (the next block tries again), never half made.
                    memory = self._host_buffer(self.count * nbytes)
                    blocks = memory[:self.count * nbytes].view(dtype).view((self.count,) + shape).unbind(0)
                    self._blocks, self._bytes = blocks, tensor_bytes(memory)
                    self._kind = (shape, dtype)  # last: the slab is made (the views keep memory alive)
                mine = (shape, dtype) == self._kind
            if not mine:
                return new_tensor(shape, dtype)
            start = index * nbytes
            return self._blocks[index], self._bytes[start:start + nbytes]

        return take


class PinnedReads:
    """Decides which read buffers are page-locked, within a byte budget.

    Pinned buffers come from torch's caching host allocator, which rounds a request up
    to a power of two and keeps the memory for the life of the process to hand it out
    again; so the budget counts each size class once. Page-locking is slow (~1 ms per
    MiB on an H100 host, holding the CUDA driver's lock), so a class beyond the budget,
    or any once pinning has failed, is read into pageable memory instead.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._classes: set[int] = set()
        self._lock = threading.Lock()
        self._failed = False

    def buffer(self, nbytes: int) -> torch.Tensor:
        if pinned.AVAILABLE and self._admit(nbytes):
            try:
                return pinned.empty((nbytes,), torch.uint8)
            except RuntimeError as exc:  # e.g. the locked-memory limit
                self._failed = True
                logger.warning("ucm file store: cannot pin a %d-byte read buffer (%s); reading into pageable "
                               "memory from now on", nbytes, exc)
        return torch.empty(nbytes, dtype=torch.uint8)

    def _admit(self, nbytes: int) -> bool:
        size_class = 1 << max(0, nbytes - 1).bit_length()
        with self._lock:
            if self._failed:
                return False
            if size_class in self._classes:
                return True
            if sum(self._classes) + size_class > self.budget_bytes:
                return False
            self._classes.add(size_class)
            return True
