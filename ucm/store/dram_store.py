"""Host-memory KV tier: an LRU of CPU tensors under a byte budget.

It sits in front of the file tier so that hot blocks (a shared system prompt,
a popular document chunk for Blend) are served at memory speed without a
syscall. Work is a memcpy, so operations run synchronously in the caller and
return already-completed tasks; a thread pool would only add latency.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ucm.config_checks import UcmConfigError
from ucm.store import pinned
from ucm.store.arena import BlockArena
from ucm.store.host_memory import available_bytes, fit_budget
from ucm.store.journal import KeyJournal
from ucm.store.base import (
    BASE_COUNTERS,
    KVStoreBase,
    StoreError,
    StoreStats,
    Task,
    check_keys,
    check_layout,
    check_tensors,
)

logger = logging.getLogger(__name__)

DEFAULT_DRAM_CAPACITY = 4 * 1024**3
"""The budget when ``capacity_bytes`` is not set, unless the host has less to spare
(:meth:`UcmDramStore.reserve` then takes half of what is available)."""


class UcmDramStore(KVStoreBase):
    """Thread-safe in-memory LRU of KV blocks.

    ``dump`` stores a private clone, so the caller may reuse its staging
    buffer as soon as the (already finished) task is returned -- except for blocks
    the store lent (:meth:`lend_blocks`): those are adopted as they are, and the
    caller must not write them after ``dump``. ``load`` by
    default returns the stored tensor itself, without a copy: the connector
    only copies it onward to the device, and cloning would halve the hit
    bandwidth. Callers must treat such tensors as read-only -- writing into
    one would corrupt the cached block. Pass ``copy_on_load=True`` to get
    private clones instead.
    """

    def __init__(self, capacity_bytes: Optional[int] = None, copy_on_load: bool = False, *,
                 config_key: str = "", host_memory: Optional[Callable[[], Optional[int]]] = None) -> None:
        """``capacity_bytes``: the byte budget; None: :data:`DEFAULT_DRAM_CAPACITY`, fitted to
        the host at :meth:`reserve`. ``config_key``: the key path of this store's config
        section, named by errors found once the KV layout is known (:meth:`reserve`); the
        factory passes it. ``host_memory``: the host's available bytes now (None: unknown);
        by default ``MemAvailable`` (tests pass their own)."""
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int) or capacity_bytes <= 0):
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self._default_capacity = capacity_bytes is None
        self.capacity_bytes = DEFAULT_DRAM_CAPACITY if capacity_bytes is None else capacity_bytes
        self._host_memory = available_bytes if host_memory is None else host_memory
        self.config_key = config_key
        self.copy_on_load = copy_on_load
        self._lock = threading.Lock()
        # key -> (tensor, layout, nbytes, arena slot or None); least- to most-recently used.
        self._blocks: "OrderedDict[bytes, Tuple[torch.Tensor, str, int, Optional[int]]]" = OrderedDict()
        self._used = 0
        self._closed = False
        self._stats = StoreStats(BASE_COUNTERS + ("rejected_layout",))
        self._reserved: set[int] = set()
        self._journal: Optional[KeyJournal] = None
        self._arena: Optional[BlockArena] = None
        self._lent: Dict[int, int] = {}  # data_ptr of a lent block -> its arena slot

    def reserve(self, block_nbytes: int, in_flight_blocks: int = 0, stage_blocks: int = 1) -> None:
        """Lay the capacity out as one arena of ``block_nbytes`` slots (pinned on CUDA
        hosts). Without an arena, pin ``in_flight_blocks`` more for the saver's staging
        copies, as buffers of ``stage_blocks`` blocks (the size the saver asks for); with
        one the saver copies straight into lent arena slots (:meth:`lend_blocks`).

        Why an arena: blocks saved together sit in consecutive slots, so a load moves a
        chunk's blocks to the GPU in one copy (:func:`ucm.store.arena.coalesce_runs`).
        Why pin now: page-locking costs ~1 ms per MiB on an H100 host and takes the CUDA
        driver lock (measured: 3,617 ``cudaHostAlloc`` calls of 2 MiB took 7.2 s while
        8K-token prompts were saved, stalling the requests running meanwhile). Costs ~1 s
        per GiB of capacity, once, at engine start. If the arena cannot be allocated
        (e.g. the locked-memory limit) blocks are pinned one by one, as many as the
        limit allows, and the store keeps working without coalesced loads.
        """
        if block_nbytes <= 0 or block_nbytes in self._reserved:
            return
        if self._arena is None:
            self.capacity_bytes = self._fitted_capacity(block_nbytes)
        self._check_capacity(block_nbytes)
        self._reserved.add(block_nbytes)
        slots = self.capacity_bytes // block_nbytes
        if self._arena is None and slots > 0:
            start = time.perf_counter()
            try:
                arena = BlockArena(block_nbytes, slots, pin=pinned.AVAILABLE)
            except RuntimeError as exc:
                logger.warning("ucm dram store: no arena of %d x %d bytes (%s); pinning blocks one by one",
                               slots, block_nbytes, exc)
                self._pin_blocks(block_nbytes, slots)
            else:
                with self._lock:
                    self._arena = arena
                logger.info("ucm dram store: arena of %d blocks of %d bytes (%.1f GiB%s) in %.1f s", slots,
                            block_nbytes, slots * block_nbytes / 1024**3, ", pinned" if pinned.AVAILABLE else "",
                            time.perf_counter() - start)
        if self._arena is None or self._arena.slot_nbytes != block_nbytes:
            stage_blocks = max(1, stage_blocks)
            self._pin_blocks(block_nbytes * stage_blocks, -(-in_flight_blocks // stage_blocks))

    def _capacity_key(self) -> str:
        return f"{self.config_key}.capacity_bytes" if self.config_key else "capacity_bytes"

    def _fitted_capacity(self, block_nbytes: int) -> int:
        """The budget against the host's available memory (:func:`fit_budget`)."""
        return fit_budget(self.capacity_bytes, self._default_capacity, block_nbytes, self._host_memory(),
                          self._capacity_key())

    def _check_capacity(self, block_nbytes: int) -> None:
        """Refuse a budget below one block: every dump would be skipped, the tier would
        cache nothing, and only a per-block warning would say so. The block size is
        known only here, once the worker knows the KV layout, so this is the first
        moment to refuse it."""
        if self.capacity_bytes < block_nbytes:
            raise UcmConfigError(self._capacity_key(), (
                f"UcmDramStore holds no block: capacity_bytes is {self.capacity_bytes} but one block of this "
                f"model's KV takes {block_nbytes} bytes; set capacity_bytes to at least {block_nbytes}"))

    def lend_blocks(self, count: int, shape: Sequence[int], dtype: torch.dtype) -> Optional[List[torch.Tensor]]:
        """``count`` free arena slots (evicting least-recently-used blocks for room), as
        tensors of ``shape``/``dtype`` that a later :meth:`dump` adopts without a copy.
        None without an arena of that slot size, or when readers still hold too many slots.

        Why: the saver's device->host copy then lands in pinned arena memory directly;
        a staging buffer would cost a second host copy of every saved byte (2 GiB for a
        cold 8K-token prompt) and pinned buffers of its own.
        """
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            arena = self._arena
            if self._closed or arena is None or nbytes != arena.slot_nbytes or not 0 < count <= arena.num_slots:
                return None
            slots = self._take_slots_locked(arena, count)
            if slots is None:
                return None
        blocks = arena.blocks(slots, shape, dtype)  # the slots are ours: views outside the lock
        with self._lock:
            if self._arena is not arena:  # closed meanwhile: nothing to lend from
                return None
            for slot, block in zip(slots, blocks):
                self._lent[block.data_ptr()] = slot
        return blocks

    def return_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        """Give lent blocks back unused; a slot is reused once the caller drops its tensor."""
        arena = self._arena
        with self._lock:
            for block in blocks:
                slot = self._lent.pop(block.data_ptr(), None)
                if slot is not None and arena is not None:
                    arena.release(slot, weakref.ref(block))

    def _pin_blocks(self, block_nbytes: int, count: int) -> None:
        """Pin ``count`` blocks and free them: they stay in torch's host cache for reuse."""
        if not pinned.AVAILABLE or count <= 0:
            return
        blocks = []
        try:
            for _ in range(count):
                blocks.append(pinned.empty((block_nbytes,), torch.uint8))
        except RuntimeError as exc:  # e.g. the locked-memory limit: pin what we can, go on
            logger.warning("ucm dram store: pinned only %d of %d blocks (%s); later inserts pin on demand",
                           len(blocks), count, exc)
        del blocks

    def lookup(self, keys: Sequence[bytes]) -> List[bool]:
        """Presence only; deliberately does not refresh LRU order (a load does)."""
        keys = check_keys(keys)
        with self._lock:
            return list(map(self._blocks.__contains__, keys))

    def load(self, keys: Sequence[bytes], layout: str) -> Task:
        """Return cached tensors (read-only unless copy_on_load); a wrong layout is a miss."""
        keys = check_keys(keys)
        layout = check_layout(layout)
        if self._closed:
            return Task.failed(StoreError("UcmDramStore is closed"), "dram load")
        out: List[Optional[torch.Tensor]] = []
        hits = misses = nbytes = 0
        with self._lock:
            for key in keys:
                entry = self._blocks.get(key)
                if entry is not None and entry[1] != layout:
                    # Same key, different layout means a misconfigured engine
                    # shares the cache; drop it so it cannot be served again.
                    logger.warning(
                        "dram block %s has layout %r, wanted %r; dropping it",
                        key.hex(), entry[1], layout,
                    )
                    self._remove_locked(key)
                    self._stats.incr("corrupt")
                    self._stats.incr("rejected_layout")
                    entry = None
                if entry is None:
                    misses += 1
                    out.append(None)
                    continue
                self._blocks.move_to_end(key)
                hits += 1
                nbytes += entry[2]
                out.append(entry[0])
        self._stats.incr("hits", hits)  # once per call: 512 blocks per 8K prompt
        self._stats.incr("misses", misses)
        self._stats.incr("bytes_read", nbytes)
        if self.copy_on_load:
            out = [t.clone() if t is not None else None for t in out]
        return Task.completed(out, f"dram load of {len(keys)} blocks")

    def dump(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], layout: str) -> Task:
        """Clone new blocks in, evicting least-recently-used ones past the budget."""
        keys = check_keys(keys)
        layout = check_layout(layout)
        check_tensors(keys, tensors)
        if self._closed:
            return Task.failed(StoreError("UcmDramStore is closed"), "dram dump")
        written = 0
        with self._lock:
            lent = [self._lent.pop(t.data_ptr(), None) for t in tensors] if self._lent else [None] * len(keys)
        try:
            if any(slot is not None for slot in lent):
                written += self._adopt([(k, t, s) for k, t, s in zip(keys, tensors, lent) if s is not None], layout)
            for key, tensor, slot in zip(keys, tensors, lent):
                if slot is None:
                    written += self._put(key, tensor, layout)
        except RuntimeError as exc:  # e.g. host OOM while cloning
            self._stats.incr("errors")
            return Task.failed(StoreError(f"dram dump failed: {exc}"), "dram dump")
        return Task.completed(written, f"dram dump of {len(keys)} blocks")

    def _put(self, key: bytes, tensor: torch.Tensor, layout: str) -> int:
        """Insert one block; returns 1 if written, 0 if skipped."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.capacity_bytes:
            logger.warning(
                "block %s (%d bytes) exceeds dram capacity %d; not cached",
                key.hex(), nbytes, self.capacity_bytes,
            )
            self._stats.incr("blocks_skipped")
            return 0
        with self._lock:
            if key in self._blocks:
                self._stats.incr("blocks_skipped")
                return 0
        arena = self._arena  # close() may drop it meanwhile; this insert keeps its own
        slot = self._take_slot(arena, nbytes)
        # Copy outside the lock: it is the expensive part and touches no shared state.
        if arena is not None and slot is not None:
            copy = arena.tensor(slot, tensor.shape, tensor.dtype)
            copy.copy_(tensor.detach())
        elif pinned.AVAILABLE:
            # Pinned host memory makes the later host-to-GPU load asynchronous and ~7x faster
            # (55 vs 7.4 GB/s measured on an H100). One copy straight into pinned memory
            # (clone() then pin_memory() would copy twice).
            copy = pinned.empty(tensor.shape, tensor.dtype)
            copy.copy_(tensor.detach())
        else:
            copy = tensor.detach().clone(memory_format=torch.contiguous_format)
        with self._lock:
            if key in self._blocks:  # another thread won the race meanwhile
                self._stats.incr("blocks_skipped")
                if arena is not None and slot is not None:
                    ref = weakref.ref(copy)
                    del copy
                    arena.release(slot, ref)
                return 0
            self._blocks[key] = (copy, layout, nbytes, slot)
            self._used += nbytes
            if self._journal is not None:
                self._journal.added((key,))
            self._evict_over_budget_locked()
        self._stats.incr("blocks_written")
        self._stats.incr("bytes_written", nbytes)
        return 1

    def _adopt(self, items: List[Tuple[bytes, torch.Tensor, int]], layout: str) -> int:
        """Insert blocks the caller wrote into lent slots ``(key, tensor, slot)``: no copy,
        the tensors are kept. Returns how many were new."""
        written = nbytes = 0
        with self._lock:
            arena = self._arena
            for key, tensor, slot in items:
                if key in self._blocks or arena is None:  # present already, or closed meanwhile
                    if arena is not None:
                        arena.release(slot, weakref.ref(tensor))
                    continue
                size = tensor.numel() * tensor.element_size()
                # The caller's own object, not a detached alias: eviction parks the slot on
                # a weak reference to it, and slower tiers may still be writing it out.
                self._blocks[key] = (tensor, layout, size, slot)
                self._used += size
                written += 1
                nbytes += size
                if self._journal is not None:
                    self._journal.added((key,))
            self._evict_over_budget_locked()
        self._stats.incr("blocks_skipped", len(items) - written)
        self._stats.incr("blocks_written", written)
        self._stats.incr("bytes_written", nbytes)
        return written

    def _take_slot(self, arena: Optional[BlockArena], nbytes: int) -> Optional[int]:
        """An arena slot for a block of ``nbytes``, evicting the least-recently-used
        block if none is free (the insert needs its room anyway). None: no arena,
        another size, or the evicted block's slot is still held by a reader -- then the
        block goes into its own tensor rather than evicting more."""
        if arena is None or nbytes != arena.slot_nbytes:
            return None
        with self._lock:
            slots = self._take_slots_locked(arena, 1)
        return slots[0] if slots else None

    def _take_slots_locked(self, arena: BlockArena, count: int) -> Optional[List[int]]:
        """``count`` arena slots, evicting least-recently-used blocks for at most the
        shortfall of free slots; None (nothing taken) if readers still hold too many.
        Caller holds the lock."""
        slots: List[int] = []
        evictions_left = count - arena.free_slots
        while len(slots) < count:
            slot = arena.take()
            if slot is not None:
                slots.append(slot)
            elif self._blocks and evictions_left > 0:
                self._remove_locked(next(iter(self._blocks)))
                self._stats.incr("evictions")
                evictions_left -= 1
            else:
                for taken in slots:
                    arena.release(taken, None)
                return None
        return slots

    def _evict_over_budget_locked(self) -> None:
        """Drop least-recently-used blocks until the byte budget holds; caller holds the lock."""
        while self._used > self.capacity_bytes:
            self._remove_locked(next(iter(self._blocks)))
            self._stats.incr("evictions")

    def _remove_locked(self, key: bytes) -> None:
        """Drop one entry; caller holds the lock. An arena slot is reused once no reader
        holds the tensor it handed out (an asynchronous copy may still read it)."""
        tensor, _layout, nbytes, slot = self._blocks.pop(key)
        self._used -= nbytes
        if self._journal is not None:
            self._journal.dropped((key,))
        if slot is not None and self._arena is not None:
            ref = weakref.ref(tensor)
            del tensor
            self._arena.release(slot, ref)

    def attach_journal(self, journal: KeyJournal) -> bool:
        """Host memory is private to this process: report its keys to ``journal``."""
        with self._lock:
            self._journal = journal
            journal.added(list(self._blocks))
        return True

    def close(self) -> None:
        """Free all cached tensors; later loads/dumps fail with StoreError."""
        with self._lock:
            if self._journal is not None:
                self._journal.dropped(list(self._blocks))
            self._closed = True
            self._blocks.clear()
            self._lent.clear()
            self._used = 0
            self._arena = None

    def stats(self) -> Dict[str, Any]:
        """Counters plus current occupancy (``used_bytes``, ``num_blocks``)."""
        out: Dict[str, Any] = dict(self._stats.snapshot())
        with self._lock:
            out["used_bytes"] = self._used
            out["num_blocks"] = len(self._blocks)
        out["capacity_bytes"] = self.capacity_bytes
        arena = self._arena
        if arena is not None:
            out["arena_slots"] = arena.num_slots
            out["arena_free_slots"] = arena.free_slots
        return out
