"""File KV tier: one file per block under a root directory (local disk or NFS).

A directory of plain files is the simplest thing several vLLM instances on
several hosts can share: a block one instance dumps is found by every other
instance's ``lookup``, which is how Blend chunk reuse scales past one machine.

Rules that make sharing safe:

* A block is written to a unique temp name in its final directory and then
  ``os.replace``-d into place, so no reader ever sees a partial file and two
  writers of the same key simply leave one complete file (the last rename wins;
  both wrote the same content for the same key).
* Every read verifies the header and checksum (:mod:`ucm.store.block_format`)
  and never unpickles; a bad file is a miss, counted, logged and removed.
* The file system is the truth for presence: ``lookup`` stats the file, so
  blocks written by other processes are found. The in-memory index only tracks
  sizes and recency for this process's capacity budget (LRU eviction); it is
  rebuilt from a directory scan (file mtimes) at start, and a hit refreshes the
  file's mtime so other processes' scans see the recency too.

Decision on a vanished root directory: it is *not* recreated. A root that
disappears is most often an NFS mount that went away, and recreating the path
would silently fill the local disk underneath the mount point. ``dump`` and
``load`` fail with a :class:`StoreError` naming the root; ``lookup`` reports
misses. Shard subdirectories, by contrast, are created on demand.

A read-only root (a published, precomputed corpus) is served read-only: loads work,
dumps are skipped and counted, nothing is evicted or removed. A FIFO or directory at a
block path is absent and left alone (:mod:`ucm.store.block_files`).

No fsync: this is a cache. A power loss can leave a renamed-but-torn file on
some file systems; the checksum turns that into a miss.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

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
from ucm.store.block_files import (BLOCK_SUFFIX, TEMP_SUFFIX, NotABlockFile, describe_oserror, is_block_file,
                                   open_block, open_root, scan_root)
from ucm.store.block_format import DTYPES, Allocator, BlockFormatError, read_block, write_block
from ucm.store.read_buffers import PinnedReads, ReadSlab

logger = logging.getLogger(__name__)

# Upper bound on header size, used only to decide whether a block can fit the budget.
_HEADER_ALLOWANCE = 1024


class UcmNfsStore(KVStoreBase):
    """Blocks as checksummed files in ``storage_backends`` with thread-pool I/O.

    ``capacity_bytes=None`` means unbounded. With a budget, this process
    evicts its least-recently-used files once the bytes it knows about exceed
    it. Several processes sharing a directory each enforce their own view, so
    give them the same budget and call :meth:`rescan` if they must converge.
    """

    def __init__(
        self,
        storage_backends: str,
        capacity_bytes: Optional[int] = None,
        io_threads: int = 4,
        stale_temp_seconds: float = 3600.0,
        pinned_read_bytes: int = 4 << 30,
    ) -> None:
        if not storage_backends:
            raise ValueError("storage_backends (the root directory) must be given")
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int) or capacity_bytes <= 0):
            raise ValueError(f"capacity_bytes must be a positive int or None, got {capacity_bytes!r}")
        if not isinstance(io_threads, int) or io_threads < 1:
            raise ValueError(f"io_threads must be a positive int, got {io_threads!r}")
        if not isinstance(pinned_read_bytes, int) or pinned_read_bytes < 0:
            raise ValueError(f"pinned_read_bytes must be an int >= 0, got {pinned_read_bytes!r}")
        self.root = os.path.abspath(os.fspath(storage_backends))
        self.capacity_bytes = capacity_bytes
        self.io_threads = io_threads
        self.stale_temp_seconds = stale_temp_seconds
        self._pinned_reads = PinnedReads(pinned_read_bytes)
        self.read_only = not open_root(self.root)
        if self.read_only:
            logger.warning("storage root %s is read-only: saves are off, lookups and loads work", self.root)
        self._odd_paths: set = set()  # non-regular files at block paths, logged once each
        self._lock = threading.Lock()
        # key -> file size; order is least- to most-recently used.
        self._index: "OrderedDict[bytes, int]" = OrderedDict()
        self._used = 0
        self._inflight: set = set()
        self._closed = False
        self._stats = StoreStats(BASE_COUNTERS + ("skipped_read_only", "not_regular"))
        self._pool = cf.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ucm-nfs-io")
        self.rescan()

    # ----- paths and index -------------------------------------------------

    def path_for(self, key: bytes) -> str:
        """Final file path of a block: sharded by the first hex byte to keep directories small."""
        hexkey = key.hex()
        return os.path.join(self.root, hexkey[:2], hexkey + BLOCK_SUFFIX)

    def rescan(self) -> None:
        """Rebuild the LRU index from the directory (mtime order) and drop stale temp files.

        Temp files younger than ``stale_temp_seconds`` are left alone: another
        process may still be writing them.
        """
        found, stale = scan_root(self.root, self.stale_temp_seconds)
        for path in [] if self.read_only else stale:
            self._unlink_quietly(path)
        with self._lock:
            self._index = OrderedDict((key, size) for _mtime, key, size in found)
            self._used = sum(size for _mtime, _key, size in found)
            victims = self._evict_locked()
        self._remove_victims(victims)
        logger.info("storage root %s: %d blocks, %d bytes", self.root, len(found), self._used)

    def _remember(self, key: bytes, size: int) -> List[Tuple[bytes, str]]:
        """Mark ``key`` most recently used; returns files to evict (removed outside the lock)."""
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
            self._index[key] = size
            self._used += size
            return self._evict_locked()

    def _forget(self, key: bytes) -> None:
        """Drop ``key`` from the index (its file is gone or rejected)."""
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size

    def _evict_locked(self) -> List[Tuple[bytes, str]]:
        """Pop LRU entries until within budget; caller holds the lock."""
        victims: List[Tuple[bytes, str]] = []
        if self.capacity_bytes is None or self.read_only:  # a read-only share is not ours to trim
            return victims
        while self._used > self.capacity_bytes and len(self._index) > 1:
            key, size = self._index.popitem(last=False)
            self._used -= size
            victims.append((key, self.path_for(key)))
        return victims

    def _remove_victims(self, victims: List[Tuple[bytes, str]]) -> None:
        """Delete evicted files; one already gone (another process evicted it) is fine."""
        for key, path in victims:
            self._unlink_quietly(path)
            self._stats.incr("evictions")
            logger.debug("evicted block %s", key.hex())

    @staticmethod
    def _unlink_quietly(path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, describe_oserror(exc))

    def _root_gone_error(self, action: str, exc: OSError) -> StoreError:
        return StoreError(
            f"{action}: storage root {self.root} vanished ({describe_oserror(exc)}); "
            "not recreating it (an unmounted NFS share must not fill the local disk)"
        )

    # ----- public API ------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> List[bool]:
        """One stat per key: the directory is the truth, so other writers' blocks are seen."""
        return [is_block_file(self.path_for(key)) for key in check_keys(keys)]

    def load(self, keys: Sequence[bytes], layout: str) -> Task:
        """Read blocks in the I/O pool; each missing or rejected block yields None.
        Blocks of one call are read back to back into one host buffer (:class:`~ucm.store.read_buffers.ReadSlab`),
        a few per pool task. A StoreError (e.g. the root is gone) fails the whole call; the
        rest of that task's blocks are then not read (nor counted as hits)."""
        keys = check_keys(keys)
        layout = check_layout(layout)
        description = f"nfs load of {len(keys)} blocks from {self.root}"
        slab = ReadSlab(len(keys), self._pinned_reads.buffer)
        # A few blocks per task, not one: per task the pool and its future take the GIL
        # several times, which with 512 two-MiB blocks serialised the I/O threads.
        per_task = max(1, -(-len(keys) // (4 * self.io_threads)))
        try:
            futures = [self._submit(self._load_many, keys[i:i + per_task], layout, slab, i)
                       for i in range(0, len(keys), per_task)]
        except StoreError as exc:
            return Task.failed(exc, description)
        return Task(futures, lambda batches: [t for batch in batches for t in batch], description)

    def dump(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], layout: str) -> Task:
        """Write new blocks in the I/O pool; the result counts blocks actually written."""
        keys = check_keys(keys)
        layout = check_layout(layout)
        check_tensors(keys, tensors)
        for tensor in tensors:
            if tensor.dtype not in DTYPES.values():
                raise ValueError(f"dtype {tensor.dtype} is not supported by the block format")
        description = f"nfs dump of {len(keys)} blocks to {self.root}"
        if self.read_only:
            self._stats.incr("skipped_read_only", len(keys))
            return Task.completed(0, description)
        futures = []
        try:
            for key, tensor in zip(keys, tensors):
                with self._lock:
                    if key in self._inflight:  # duplicate in this call or a concurrent dump
                        self._stats.incr("blocks_skipped")
                        continue
                    self._inflight.add(key)
                try:
                    futures.append(self._submit(self._dump_one, key, tensor.contiguous(), layout))
                except BaseException:
                    with self._lock:
                        self._inflight.discard(key)
                    raise
        except StoreError as exc:
            return Task.failed(exc, description)
        return Task(futures, sum, description)

    def _submit(self, fn: Any, *args: Any) -> cf.Future:
        if self._closed:
            raise StoreError(f"UcmNfsStore on {self.root} is closed")
        try:
            return self._pool.submit(fn, *args)
        except RuntimeError as exc:  # pool shut down between the check and submit
            raise StoreError(f"UcmNfsStore on {self.root} is closed") from exc

    # ----- workers (run in the I/O pool) -------------------------------------

    def _load_many(self, keys: Sequence[bytes], layout: str, slab: ReadSlab, first: int) -> List[Optional[torch.Tensor]]:
        return [self._load_one(key, layout, slab.allocator(first + i)) for i, key in enumerate(keys)]

    def _load_one(self, key: bytes, layout: str, alloc: Optional[Allocator] = None) -> Optional[torch.Tensor]:
        path = self.path_for(key)
        try:
            f = open_block(path)
        except NotABlockFile:
            self._not_regular(key, path)
            return None
        except FileNotFoundError as exc:
            if not os.path.isdir(self.root):
                self._stats.incr("errors")
                raise self._root_gone_error(f"load of block {key.hex()}", exc) from exc
            self._forget(key)  # evicted by someone else since we last saw it
            self._stats.incr("misses")
            return None
        except OSError as exc:
            self._stats.incr("errors")
            raise StoreError(f"load of block {key.hex()}: cannot open {path}: {describe_oserror(exc)}") from exc
        with f:
            try:
                tensor = read_block(f, key, layout, alloc)
            except BlockFormatError as exc:
                self._reject(key, path, f, exc)
                return None
            except OSError as exc:
                self._stats.incr("errors")
                raise StoreError(f"load of block {key.hex()}: read {path} failed: {describe_oserror(exc)}") from exc
            size = f.tell()  # read_block checked the file ends where its payload does
        try:
            os.utime(path)  # recency for other processes' scans; a read-only share is fine
        except OSError:
            pass
        self._stats.incr("hits")
        self._stats.incr("bytes_read", size)
        self._remove_victims(self._remember(key, size))
        return tensor

    def _not_regular(self, key: bytes, path: str) -> None:
        """A FIFO, directory, ... at a block path: a miss, logged once per path, never removed."""
        self._stats.incr("not_regular")
        self._stats.incr("misses")
        self._forget(key)
        with self._lock:
            first = path not in self._odd_paths
            self._odd_paths.add(path)
        if first:
            logger.warning("%s is not a regular file: treated as absent and left alone", path)

    def _reject(self, key: bytes, path: str, f: Any, exc: BlockFormatError) -> None:
        """Count, log and remove a bad file -- unless a writer replaced it meanwhile."""
        logger.warning("rejecting block file %s (%s): %s", path, exc.reason, exc)
        self._stats.incr("corrupt")
        self._stats.incr(f"rejected_{exc.reason}")
        self._stats.incr("misses")
        self._forget(key)
        try:
            ours = os.fstat(f.fileno())
            now = os.stat(path)
        except OSError:
            return
        if (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino) and not self.read_only:
            self._unlink_quietly(path)

    def _dump_one(self, key: bytes, tensor: torch.Tensor, layout: str) -> int:
        try:
            return self._write_block(key, tensor, layout)
        finally:
            with self._lock:
                self._inflight.discard(key)

    def _write_block(self, key: bytes, tensor: torch.Tensor, layout: str) -> int:
        path = self.path_for(key)
        what = f"dump of block {key.hex()} to {path}"
        if os.path.exists(path):
            self._stats.incr("blocks_skipped")
            return 0
        nbytes = tensor.numel() * tensor.element_size()
        if self.capacity_bytes is not None and nbytes + _HEADER_ALLOWANCE > self.capacity_bytes:
            logger.warning("%s skipped: %d bytes exceed capacity %d", what, nbytes, self.capacity_bytes)
            self._stats.incr("blocks_skipped")
            return 0
        shard = os.path.dirname(path)
        try:
            os.mkdir(shard)
        except FileExistsError:
            pass
        except FileNotFoundError as exc:
            self._stats.incr("errors")
            raise self._root_gone_error(what, exc) from exc
        except OSError as exc:
            self._stats.incr("errors")
            raise StoreError(f"{what}: cannot create {shard}: {describe_oserror(exc)}") from exc
        tmp = os.path.join(
            shard, f".{key.hex()}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
        )
        try:
            with open(tmp, "xb", buffering=0) as f:
                size = write_block(f, key, layout, tensor)
            os.replace(tmp, path)
        except OSError as exc:
            self._unlink_quietly(tmp)
            self._stats.incr("errors")
            if not os.path.isdir(self.root):
                raise self._root_gone_error(what, exc) from exc
            raise StoreError(f"{what} failed: {describe_oserror(exc)}") from exc
        except BaseException:
            self._unlink_quietly(tmp)
            raise
        self._stats.incr("blocks_written")
        self._stats.incr("bytes_written", size)
        self._remove_victims(self._remember(key, size))
        return 1

    # ----- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Finish queued I/O, then stop the pool; later operations fail with StoreError."""
        self._closed = True
        self._pool.shutdown(wait=True)

    def stats(self) -> Dict[str, Any]:
        """Counters (incl. per-reason ``rejected_*``) plus this process's index occupancy."""
        out: Dict[str, Any] = dict(self._stats.snapshot())
        with self._lock:
            out["used_bytes"] = self._used
            out["num_blocks"] = len(self._index)
        out["capacity_bytes"] = self.capacity_bytes
        out["read_only"] = self.read_only
        return out
