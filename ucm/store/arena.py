"""Fixed-size block slots carved out of one host tensor.

Why one tensor: blocks saved together (a chunk's 32 blocks of 16 tokens) land in
consecutive slots, so a later load can move a run of them to the GPU with a single
copy instead of one ``cudaMemcpyAsync`` per block (512 copies of 2 MiB per 8K-token
prompt cost ~10 ms of host time on an H100 host). It also pins the DRAM tier's
whole capacity with a single page-lock at engine start.

Why weak references: a slot is reused only once nobody holds the tensor handed out
for it. A loader copying from a block asynchronously keeps that tensor until its
copy has landed; an eviction meanwhile parks the slot instead of overwriting bytes
still in flight.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Optional, Sequence

import torch

from ucm.store import pinned


class BlockArena:
    """``num_slots`` slots of ``slot_nbytes`` bytes in one (optionally pinned) tensor."""

    def __init__(self, slot_nbytes: int, num_slots: int, pin: bool = False) -> None:
        if slot_nbytes <= 0 or num_slots <= 0:
            raise ValueError(f"arena needs positive sizes, got {slot_nbytes} bytes x {num_slots} slots")
        self.slot_nbytes = slot_nbytes
        self.num_slots = num_slots
        size = slot_nbytes * num_slots
        self.memory = pinned.empty((size,), torch.uint8) if pin else torch.empty(size, dtype=torch.uint8)
        # Ascending at start, so consecutive inserts take consecutive slots; freed slots
        # rejoin in eviction order (LRU order, i.e. mostly the order they were filled).
        self._free: deque[int] = deque(range(num_slots))
        self._parked: dict[int, weakref.ref] = {}  # evicted, but its tensor is still held

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> Optional[int]:
        """A free slot, or None when every slot is used or still held by a reader."""
        if self._free:
            return self._free.popleft()
        for slot, ref in list(self._parked.items()):
            if ref() is None:
                del self._parked[slot]
                return slot
        return None

    def tensor(self, slot: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The slot as a tensor of ``shape`` and ``dtype`` (which must fill it exactly)."""
        start = slot * self.slot_nbytes
        flat = self.memory[start:start + self.slot_nbytes].view(dtype)
        return flat.view(tuple(shape))

    def blocks(self, slots: Sequence[int], shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """The slots as tensors of ``shape``/``dtype``, one view per run of consecutive
        slots split in C++ (a view per slot in Python costs ~5 us each: 1,030 blocks per
        cold 8K-token save)."""
        typed = self.memory.view(dtype).view((self.num_slots,) + tuple(shape))
        out: list[torch.Tensor] = []
        i = 0
        while i < len(slots):
            j = i + 1
            while j < len(slots) and slots[j] == slots[j - 1] + 1:
                j += 1
            out.extend(typed[slots[i]:slots[j - 1] + 1].unbind(0))
            i = j
        return out

    def release(self, slot: int, handed_out: "Optional[weakref.ref[torch.Tensor]]") -> None:
        """Give ``slot`` back. ``handed_out``: a weak reference to the tensor readers got
        for it (the caller has dropped its own), None if it was never handed out. Reused
        at once if that tensor is gone, else parked until it is."""
        if handed_out is None or handed_out() is None:
            self._free.append(slot)
        else:
            self._parked[slot] = handed_out


def coalesce_runs(parts: Sequence[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """Group equally shaped contiguous tensors that lie back to back in memory.

    Returns ``(first, count, view)`` per run, ``view`` of shape ``[count, *part.shape]``
    over the run's bytes. Blocks from a :class:`BlockArena` saved together form long
    runs; blocks from anywhere else form runs of one, so callers need not care.
    """
    runs: list[tuple[int, int, torch.Tensor]] = []
    i = 0
    n = len(parts)
    while i < n:
        first = parts[i]
        nbytes = first.numel() * first.element_size()
        j = i + 1
        if first.is_contiguous():
            base = first.untyped_storage().data_ptr()
            end = first.data_ptr() + nbytes
            while j < n:
                nxt = parts[j]
                if (nxt.data_ptr() != end or not nxt.is_contiguous() or nxt.shape != first.shape
                        or nxt.dtype != first.dtype or nxt.untyped_storage().data_ptr() != base):
                    break
                end += nbytes
                j += 1
        count = j - i
        if count == 1:
            view = first.unsqueeze(0)
        else:
            view = first.as_strided((count,) + tuple(first.shape), (first.numel(),) + tuple(first.stride()),
                                    first.storage_offset())
        runs.append((i, count, view))
        i = j
    return runs
