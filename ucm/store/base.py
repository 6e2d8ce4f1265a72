"""The store contract shared by every KV-cache tier.

The vLLM connector talks to exactly one object of this type (a single tier or a
:class:`~ucm.store.pipeline_store.UcmPipelineStore` of several), both for plain
prefix caching and for Blend chunk reuse. Keeping the contract small (lookup,
load, dump, wait) is what lets tiers be stacked and swapped from config alone.

Operations that touch slow media return a :class:`Task` immediately so the
connector can overlap I/O with model execution; :meth:`KVStoreBase.wait` is the
single place where results, failures and timeouts surface, always as either the
result or a :class:`StoreError` -- a task never hangs and never leaks a raw
``OSError`` to the engine.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ucm.store.journal import KeyJournal

# Longest key accepted. Keys become file names (hex, two chars per byte) and
# most file systems cap a name at 255 bytes, so leave room for the suffix.
MAX_KEY_BYTES = 100
# Layout strings are short axis labels such as "LKBHD"; the cap keeps headers small.
MAX_LAYOUT_CHARS = 64


class StoreError(RuntimeError):
    """A store operation failed; the message names the key or path and the cause.

    One exception type lets the connector treat every store failure the same
    way (log it, fall back to recomputing the KV) without knowing which tier
    or which syscall failed.
    """


class Task:
    """Handle for an in-flight store operation.

    It wraps one or more :class:`concurrent.futures.Future` objects plus a
    function that folds their results into the operation's result. Several
    futures instead of one coordinating future means no pool thread ever blocks
    waiting on another pool thread, which is how a saturated pool could
    otherwise deadlock.
    """

    def __init__(
        self,
        futures: Sequence[cf.Future],
        combine: Callable[[List[Any]], Any],
        description: str,
    ) -> None:
        self._futures = list(futures)
        self._combine = combine
        self.description = description

    @classmethod
    def completed(cls, value: Any, description: str) -> "Task":
        """A task that is already done, for tiers that work synchronously."""
        fut: cf.Future = cf.Future()
        fut.set_result(value)
        return cls([fut], lambda results: results[0], description)

    @classmethod
    def failed(cls, error: BaseException, description: str) -> "Task":
        """A task that already failed, so callers see errors only via wait()."""
        fut: cf.Future = cf.Future()
        fut.set_exception(error)
        return cls([fut], lambda results: results[0], description)

    def done(self) -> bool:
        """True once every part finished (successfully or not); never blocks."""
        return all(f.done() for f in self._futures)

    def add_done_callback(self, fn: Callable[["Task"], None]) -> None:
        """Call ``fn(self)`` once, when every part finished (at once if all have).

        Why: a caller that tracks what is still being written (the connector's
        in-flight saves) must learn when a store's write lands, whichever thread
        the store finishes it on, without a thread of its own waiting for it.
        """
        left = [len(self._futures)]
        lock = threading.Lock()

        def part_done(_future: cf.Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                fn(self)

        if not self._futures:
            fn(self)
        for future in self._futures:
            future.add_done_callback(part_done)

    def result(self, timeout: Optional[float] = None) -> Any:
        """Block for the result; raise :class:`StoreError` on failure or timeout."""
        done, not_done = cf.wait(self._futures, timeout=timeout)
        if not_done:
            raise StoreError(
                f"{self.description}: timed out after {timeout}s "
                f"({len(not_done)} of {len(self._futures)} parts unfinished)"
            )
        results = []
        for fut in self._futures:
            if fut.cancelled():
                raise StoreError(f"{self.description}: cancelled (store closed?)")
            exc = fut.exception()
            if isinstance(exc, StoreError):
                raise exc
            if exc is not None:
                raise StoreError(f"{self.description}: {exc!r}") from exc
            results.append(fut.result())
        return self._combine(results)


class StoreStats:
    """Thread-safe named counters, because I/O threads update them concurrently."""

    def __init__(self, names: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {name: 0 for name in names}

    def incr(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (created on first use)."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    def snapshot(self) -> Dict[str, int]:
        """A consistent copy, safe to hand to metrics code."""
        with self._lock:
            return dict(self._counts)


BASE_COUNTERS = (
    "hits",
    "misses",
    "corrupt",
    "evictions",
    "bytes_read",
    "bytes_written",
    "blocks_written",
    "blocks_skipped",
    "errors",
)


def check_keys(keys: Sequence[bytes]) -> List[bytes]:
    """Validate keys up front so a bad caller fails loudly, not inside an I/O thread."""
    if not keys:
        return []
    # The usual case, checked by C-level passes (no Python frame per key: ~1,000 keys per
    # 8K-token prompt, on the scheduler's path before its first step).
    if set(map(type, keys)) == {bytes} and min(map(len, keys)) > 0 and max(map(len, keys)) <= MAX_KEY_BYTES:
        return list(keys)
    out = []
    for key in keys:
        if isinstance(key, bytearray):
            key = bytes(key)
        if not isinstance(key, bytes):
            raise TypeError(f"store keys must be bytes, got {type(key).__name__}")
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"store key length {len(key)} not in 1..{MAX_KEY_BYTES}")
        out.append(key)
    return out


def check_layout(layout: str) -> str:
    """Layouts are stored in block headers, so they must be short ASCII."""
    if not isinstance(layout, str) or not layout.isascii():
        raise TypeError(f"layout must be an ASCII str, got {layout!r}")
    if len(layout) > MAX_LAYOUT_CHARS:
        raise ValueError(f"layout {layout!r} longer than {MAX_LAYOUT_CHARS} chars")
    return layout


def check_tensors(keys: Sequence[bytes], tensors: Sequence[torch.Tensor]) -> None:
    """Reject mismatched or non-CPU input before any byte is written."""
    if len(keys) != len(tensors):
        raise ValueError(f"dump got {len(keys)} keys but {len(tensors)} tensors")
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"dump values must be torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"dump needs CPU tensors, got one on {tensor.device}")


class KVStoreBase(ABC):
    """One tier (or a stack of tiers) of the KV cache, addressed by block keys.

    A value is one contiguous CPU tensor per block plus a layout string (axis
    labels such as ``"LKBHD"``) that is stored with it and checked on load, so
    a block written by a differently-shaped engine is never mistaken for ours.
    A load returns ``None`` for a block that is missing or rejected: the
    contract is "correct data or nothing", since the engine can always
    recompute a miss but cannot detect wrong KV.
    """

    @abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> List[bool]:
        """Which keys are present right now; cheap, synchronous, never raises for I/O."""

    @abstractmethod
    def load(self, keys: Sequence[bytes], layout: str) -> Task:
        """Start reading blocks; the result is ``list[Optional[Tensor]]`` aligned with keys."""

    @abstractmethod
    def dump(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], layout: str) -> Task:
        """Start writing blocks; the result is how many were newly written.

        Keys already present are skipped (the content for a key is determined
        by the key, so rewriting it would only cost bandwidth). The caller must
        not modify ``tensors`` until the task is done: stores read them during
        the I/O rather than copying up front.
        """

    def wait(self, task: Task, timeout: Optional[float] = None) -> Any:
        """Block until ``task`` finishes; return its result or raise :class:`StoreError`."""
        return task.result(timeout)

    def reserve(self, block_nbytes: int, in_flight_blocks: int = 0, stage_blocks: int = 1) -> None:
        """Hint that blocks of ``block_nbytes`` bytes will be dumped, up to
        ``in_flight_blocks`` of them staged at a time by the caller, in host buffers of
        ``stage_blocks`` blocks each; a no-op here.

        A tier may prepare memory for them up front (the DRAM tier pins its capacity on
        CUDA hosts, so no save ever waits for the driver to page-lock memory).
        """

    def lend_blocks(self, count: int, shape: Sequence[int], dtype: torch.dtype) -> Optional[List[torch.Tensor]]:
        """``count`` writable host blocks of ``shape``/``dtype`` that a later :meth:`dump`
        takes over without copying them; None: this store lends none.

        Why: a saver copying KV off the GPU can then land it straight in the tier's own
        (pinned) memory, instead of in a staging buffer that the tier copies again. A
        caller that does not dump a lent block (a failed copy) hands it back with
        :meth:`return_blocks`. Dumping a lent block under a key already present just
        gives the block back.
        """
        return None

    def return_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        """Give back lent blocks that were never dumped (no-op for stores that lend none)."""

    def commit(self, keys: Sequence[bytes], success: bool = True) -> None:
        """Hook for stores that publish dumps in a second step; a no-op here.

        Our stores make a block visible atomically when its write completes
        (temp file + rename, or one dict insert), so there is nothing to commit;
        the method exists so the connector can call it uniformly.
        """

    def attach_journal(self, journal: "KeyJournal") -> bool:
        """Report every key this store adds or drops to ``journal`` (current keys count as
        added). Only tiers private to this process do (host memory); a tier every process
        sees (files) needs no journal and returns False."""
        return False

    def close(self) -> None:
        """Release threads and handles; later operations fail with StoreError."""

    def stats(self) -> Dict[str, Any]:
        """Counters (hits, misses, corrupt, evictions, bytes_read, bytes_written, ...)."""
        return {}

    def __enter__(self) -> "KVStoreBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
