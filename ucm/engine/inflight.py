"""Keys whose save is still under way in this process.

A save returns before its blocks are in the store: on CUDA the device-to-host copy and
the store insert run off the request path (see ``WorkerSide``), and on any platform a
store may write in threads of its own (the file store's I/O pool). A request that
arrives right after and needs those very blocks (a chunk precomputed a moment ago)
would otherwise miss them and recompute. The scheduler side asks this registry to
wait for exactly the keys it is about to look up; keys nobody is saving cost a dict
lookup. Scheduler and worker share it when they share a process (TP = 1; with
TP > 1 the workers are other processes and a lookup simply misses until the dump
lands, which is correct, only slower).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Iterable, Union

from ucm.store.base import Task

Pending = Union[cf.Future, Task]
"""A dump's handle: both kinds have ``result(timeout)`` and ``add_done_callback``."""


class InflightSaves:
    """Thread-safe map from store key to the handle of the dump writing it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[bytes, Pending] = {}

    def add(self, keys: Iterable[bytes], future: Pending) -> None:
        """Register ``keys`` as being saved until ``future`` (a Future, or the store's Task) is done."""
        keys = list(keys)
        with self._lock:
            for key in keys:
                self._futures[key] = future
        future.add_done_callback(lambda done: self._drop(keys, done))

    def _drop(self, keys: list[bytes], future: Pending) -> None:
        with self._lock:
            for key in keys:
                if self._futures.get(key) is future:
                    del self._futures[key]

    def wait(self, keys: Iterable[bytes], timeout: float = 30.0) -> None:
        """Block until no dump of ``keys`` is pending (errors are the saver's to report)."""
        with self._lock:
            if not self._futures:
                return
            pending = {id(f): f for f in (self._futures.get(k) for k in keys) if f is not None}
        deadline = time.monotonic() + timeout
        for future in pending.values():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # a failed or slow dump: the lookup then misses, the saver logs it
                pass

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)


INFLIGHT = InflightSaves()
