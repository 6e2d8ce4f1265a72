"""Keys whose save is still under way in this process.

On CUDA a save returns before its blocks are in the store (the device-to-host copy
and the store insert run off the request path, see ``WorkerSide``). A request that
arrives right after and needs those very blocks (a chunk precomputed a moment ago)
would otherwise miss them and recompute. The scheduler side asks this registry to
wait for exactly the keys it is about to look up; keys nobody is saving cost a dict
lookup. Scheduler and worker share it when they share a process (one GPU; with
TP > 1 the workers are other processes and a lookup simply misses until the dump
lands, which is correct, only slower).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Iterable


class InflightSaves:
    """Thread-safe map from store key to the future of the dump writing it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[bytes, cf.Future] = {}

    def add(self, keys: Iterable[bytes], future: cf.Future) -> None:
        keys = list(keys)
        with self._lock:
            for key in keys:
                self._futures[key] = future
        future.add_done_callback(lambda done: self._drop(keys, done))

    def _drop(self, keys: list[bytes], future: cf.Future) -> None:
        with self._lock:
            for key in keys:
                if self._futures.get(key) is future:
                    del self._futures[key]

    def wait(self, keys: Iterable[bytes], timeout: float = 30.0) -> None:
        """Block until no dump of ``keys`` is pending (errors are the saver's to report)."""
        with self._lock:
            if not self._futures:
                return
            pending = {self._futures[k] for k in keys if k in self._futures}
        if pending:
            cf.wait(pending, timeout=timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)


INFLIGHT = InflightSaves()
