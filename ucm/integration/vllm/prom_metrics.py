"""ucm's counters in vLLM's Prometheus ``/metrics``, under ``ucm_`` names.

vLLM's front end builds one ``KVConnectorPromMetrics`` per engine set through the
connector class's ``build_prom_metrics`` and hands it each step's aggregated
connector stats (:mod:`ucm.integration.vllm.connector_stats`: deltas since the last
step). Every ucm value is a count or a duration, so each is a Prometheus counter
incremented by the delta; labels are vLLM's (``model_name``, ``engine``).

Names start with ``ucm_`` (not ``vllm:``) because they are ucm's, not vLLM's; vLLM's
own re-registration cleanup only removes ``vllm:`` collectors, so ours are removed
here before they are registered again (a second logger in one process would
otherwise fail with a duplicate time series).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, Counter
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from ucm.integration.vllm.connector_stats import DECISION_PREFIX

logger = logging.getLogger(__name__)

# stats key -> (Prometheus name without "_total", help text)
COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("ucm_requests", "Finished requests ucm planned (looked up in its store)."),
    "prompt_tokens": ("ucm_prompt_tokens", "Prompt tokens of the requests ucm planned."),
    "prefix_hit_tokens": ("ucm_prefix_hit_tokens", "Prompt tokens loaded from ucm's store as an exact prefix."),
    "chunk_hit_tokens": ("ucm_chunk_hit_tokens", "Chunk tokens found in ucm's store (CacheBlend reuse candidates)."),
    "chunk_tokens": ("ucm_chunk_tokens", "Tokens inside chunks of the requests ucm planned (hit or not)."),
    "reusable_tokens": ("ucm_reusable_tokens", "Chunk rows Blend could take from the store in a forward."),
    "recomputed_tokens": ("ucm_recomputed_tokens", "Reusable chunk rows Blend recomputed anyway (top deviation)."),
    "loaded_blocks": ("ucm_loaded_blocks", "KV blocks loaded from ucm's store."),
    "failed_blocks": ("ucm_load_failed_blocks", "KV block loads that failed (recomputed as misses)."),
    "saved_blocks": ("ucm_saved_blocks", "KV blocks handed to ucm's store to save."),
    "failed_saves": ("ucm_save_failed_blocks", "KV block saves the store failed."),
    "load_bytes": ("ucm_load_bytes", "Bytes of KV blocks loaded from ucm's store (per worker, summed)."),
    "save_bytes": ("ucm_save_bytes", "Bytes of KV blocks handed to ucm's store (per worker, summed)."),
    "load_seconds": ("ucm_load_seconds", "Host seconds the workers spent in ucm's load call (store read, issue)."),
    "save_seconds": ("ucm_save_seconds", "Host seconds the workers spent in ucm's save call (gather, dump)."),
    "blend_fallbacks": ("ucm_blend_fallbacks", "Blend steps that failed and ran as a plain prefill."),
}
REUSED = ("ucm_reused_tokens", "Chunk rows whose stored KV Blend kept (reusable minus recomputed).")
DECISIONS = ("ucm_blend_decisions", "Pay-policy decisions per request with chunk hits, by decision.")


def metric_names() -> list[str]:
    """Every Prometheus name ucm registers (without the ``_total`` suffix)."""
    return [name for name, _ in COUNTERS.values()] + [REUSED[0], DECISIONS[0]]


def _unregister_ucm_collectors() -> None:
    """Drop ucm's collectors from the default registry (see the module docstring)."""
    wanted = set(metric_names())
    for collector in list(getattr(REGISTRY, "_collector_to_names", {})):
        if getattr(collector, "_name", None) in wanted:
            REGISTRY.unregister(collector)


class UcmPromMetrics(KVConnectorPromMetrics):
    """ucm's counters, one child per engine (vLLM's labels)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        if self._counter_cls is Counter:
            _unregister_ucm_collectors()
        self._counters: dict[str, Any] = {}
        for key, (name, doc) in list(COUNTERS.items()) + [("reused_tokens", REUSED)]:
            self._counters[key] = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
        self._decisions = self._counter_cls(name=DECISIONS[0], documentation=DECISIONS[1],
                                            labelnames=labelnames + ["decision"])
        self._children: dict[tuple[int, str, str], Any] = {}

    def _child(self, engine_idx: int, key: str, decision: str = "") -> Any:
        found = self._children.get((engine_idx, key, decision))
        if found is None:
            values = self.per_engine_labelvalues[engine_idx]
            metric = self._decisions.labels(*values, decision) if decision else self._counters[key].labels(*values)
            found = self._children[(engine_idx, key, decision)] = metric
        return found

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data or {}
        for key, value in data.items():
            if not value or not isinstance(value, (int, float)) or value < 0:
                continue
            if key in COUNTERS:
                self._child(engine_idx, key).inc(value)
            elif key.startswith(DECISION_PREFIX):
                self._child(engine_idx, "", key[len(DECISION_PREFIX):]).inc(value)
        reused = data.get("reusable_tokens", 0) - data.get("recomputed_tokens", 0)
        if reused > 0:
            self._child(engine_idx, "reused_tokens").inc(reused)
