"""Per-request ucm statistics, collected in-process.

The scheduler side records what a request reused (prefix and chunk hits), the
worker side what Blend recomputed. With vLLM's in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) both land here and :func:`request_stats`
gives the merged record; with a multi-process engine each process holds its part
(and the scheduler part is also logged per request).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional

from ucm.sparse.blend.plan import ReusePlan

DEFAULT_CAPACITY = 10_000  # ~450 bytes a record: a few MB at most


def caller_id(req_id: str) -> Optional[str]:
    """The id the caller gave, from vLLM's internal one (it appends ``-<random suffix>``)."""
    head, sep, _ = req_id.rpartition("-")
    return head if sep else None


class StatsRegistry:
    """Per-request records, the ``capacity`` most recently written kept.

    A server finishes requests forever; an unbounded dict grew by every one of them.
    Records are read after their request finishes (by the caller, soon), so the
    least recently written go first. Lookups by vLLM's internal id or by the
    caller's id are both one dict access: the caller's id is indexed as records
    are written (the newest request with that caller id wins).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"stats capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._by_caller: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._records)

    def _entry(self, req_id: str) -> dict[str, Any]:
        """The record to update (made if new), now the most recent; the oldest beyond capacity dropped."""
        entry = self._records.get(req_id)
        if entry is None:
            entry = self._records[req_id] = {}
            caller = caller_id(req_id)
            if caller is not None:
                self._by_caller[caller] = req_id
            while len(self._records) > self.capacity:
                old, _ = self._records.popitem(last=False)
                old_caller = caller_id(old)
                if old_caller is not None and self._by_caller.get(old_caller) == old:
                    del self._by_caller[old_caller]
        else:
            self._records.move_to_end(req_id)
        return entry

    def record_plan(self, req_id: str, plan: ReusePlan, **extra: Any) -> None:
        """The scheduler's part: the plan's counts, and ``extra`` (the pay decision)."""
        with self._lock:
            self._entry(req_id).update(plan.summary(), **extra)

    def record_step(self, req_id: str, num_reusable: int, num_recomputed: int) -> None:
        """Add one forward's Blend outcome for a request (chunked prefills add several)."""
        with self._lock:
            entry = self._entry(req_id)
            reusable = entry.get("reusable_tokens", 0) + num_reusable
            recomputed = entry.get("recomputed_reused_tokens", 0) + num_recomputed
            entry.update(reusable_tokens=reusable, recomputed_reused_tokens=recomputed,
                         reused_tokens=reusable - recomputed,
                         recompute_ratio=recomputed / reusable if reusable else None)

    def add(self, req_id: str, **counts: int) -> None:
        """Add to a request's counters (made at 0)."""
        with self._lock:
            entry = self._entry(req_id)
            for name, value in counts.items():
                entry[name] = entry.get(name, 0) + value

    def get(self, req_id: str) -> dict[str, Any]:
        """A copy of one request's record, by internal or caller id (empty if none)."""
        with self._lock:
            entry = self._records.get(req_id)
            if entry is None:
                key = self._by_caller.get(req_id)
                entry = self._records.get(key) if key is not None else None
            return dict(entry) if entry is not None else {}

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._by_caller.clear()


REGISTRY = StatsRegistry()  # the process's registry: the connector and Blend agent record here


def record_plan(req_id: str, plan: ReusePlan, **extra: Any) -> None:
    REGISTRY.record_plan(req_id, plan, **extra)


def record_step(req_id: str, num_reusable: int, num_recomputed: int) -> None:
    """Add one forward's Blend outcome for a request (and to the interval counters)."""
    add_interval(reusable_tokens=num_reusable, recomputed_tokens=num_recomputed)
    REGISTRY.record_step(req_id, num_reusable, num_recomputed)


def record_fallback(req_id: str, num_reusable: int) -> None:
    """A forward whose Blend step failed ran as a plain prefill: the request's reusable
    rows were all recomputed (``recompute_ratio`` says what ran), and it is marked."""
    if not num_reusable:
        return
    record_step(req_id, num_reusable, num_reusable)
    REGISTRY.add(req_id, blend_fallbacks=1)


def request_stats(req_id: str) -> dict[str, Any]:
    """The merged record of one request (empty if ucm saw nothing of it, or it was dropped).

    Accepts the id vLLM returns to the caller as well as the engine's internal id
    (vLLM appends ``-<random suffix>`` to the caller's id).
    """
    return REGISTRY.get(req_id)


def clear() -> None:
    REGISTRY.clear()


_LOCK = threading.Lock()
_INTERVAL: dict[str, int] = {}
_TOTALS: dict[str, int] = {}


def add_interval(**counts: int) -> None:
    """Add to the counters vLLM's periodic stats logging will collect next (and to the
    process's running totals)."""
    with _LOCK:
        for name, value in counts.items():
            _INTERVAL[name] = _INTERVAL.get(name, 0) + value
            _TOTALS[name] = _TOTALS.get(name, 0) + value


def totals() -> dict[str, int]:
    """Every counter since the process started (vLLM's stats logging drains the interval)."""
    with _LOCK:
        return dict(_TOTALS)


def take_interval() -> dict[str, int]:
    """The counters since the last call (and reset them)."""
    with _LOCK:
        out = dict(_INTERVAL)
        _INTERVAL.clear()
        return out
