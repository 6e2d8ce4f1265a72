"""Per-request ucm statistics, collected in-process.

The scheduler side records what a request reused (prefix and chunk hits), the
worker side what Blend recomputed. With vLLM's in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) both land here and :func:`request_stats`
gives the merged record; with a multi-process engine each process holds its part
(and the scheduler part is also logged per request).
"""

from __future__ import annotations

import threading
from typing import Any

from ucm.sparse.blend.plan import ReusePlan

_LOCK = threading.Lock()
_STATS: dict[str, dict[str, Any]] = {}


def record_plan(req_id: str, plan: ReusePlan) -> None:
    with _LOCK:
        entry = _STATS.setdefault(req_id, {})
        entry.update(prompt_tokens=plan.num_tokens, prefix_hit_tokens=plan.prefix_hit_tokens,
                     chunk_hit_tokens=plan.chunk_hit_tokens, chunk_tokens=plan.num_chunk_tokens)


def record_step(req_id: str, num_reusable: int, num_recomputed: int) -> None:
    """Add one forward's Blend outcome for a request (chunked prefills add several)."""
    add_interval(reusable_tokens=num_reusable, recomputed_tokens=num_recomputed)
    with _LOCK:
        entry = _STATS.setdefault(req_id, {})
        reusable = entry.get("reusable_tokens", 0) + num_reusable
        recomputed = entry.get("recomputed_reused_tokens", 0) + num_recomputed
        entry.update(reusable_tokens=reusable, recomputed_reused_tokens=recomputed,
                     reused_tokens=reusable - recomputed, recompute_ratio=recomputed / reusable if reusable else None)


def request_stats(req_id: str) -> dict[str, Any]:
    """The merged record of one request (empty if ucm saw nothing of it).

    Accepts the id vLLM returns to the caller as well as the engine's internal id
    (vLLM appends ``-<random suffix>`` to the caller's id).
    """
    with _LOCK:
        if req_id in _STATS:
            return dict(_STATS[req_id])
        for key, value in _STATS.items():
            if key.rsplit("-", 1)[0] == req_id:
                return dict(value)
        return {}


def clear() -> None:
    with _LOCK:
        _STATS.clear()


_INTERVAL: dict[str, int] = {}


def add_interval(**counts: int) -> None:
    """Add to the counters vLLM's periodic stats logging will collect next."""
    with _LOCK:
        for name, value in counts.items():
            _INTERVAL[name] = _INTERVAL.get(name, 0) + value


def take_interval() -> dict[str, int]:
    """The counters since the last call (and reset them)."""
    with _LOCK:
        out = dict(_INTERVAL)
        _INTERVAL.clear()
        return out


def connector_stats(data: dict[str, Any]):
    """A vLLM ``KVConnectorStats`` over ucm's counters (built lazily: imports vllm)."""
    from ucm.integration.vllm.connector_stats import UcmConnectorStats

    return UcmConnectorStats(data=dict(data))
