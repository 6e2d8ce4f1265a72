"""ucm's counters in the shape vLLM's KV-connector stats logging expects.

Workers report counters per step (blocks loaded, failed, saved; reused and
recomputed tokens); vLLM aggregates them across workers and steps and logs
``KV Transfer metrics: ...`` periodically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class UcmConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "UcmConnectorStats":
        merged: dict[str, Any] = dict(self.data)
        for key, value in other.data.items():
            merged[key] = merged.get(key, 0) + value
        return UcmConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data)
        reusable = self.data.get("reusable_tokens", 0)
        if reusable:
            out["recompute_ratio"] = round(self.data.get("recomputed_tokens", 0) / reusable, 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())
