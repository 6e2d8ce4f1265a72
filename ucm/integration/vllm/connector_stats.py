"""ucm's counters in the shape vLLM's KV-connector stats path expects.

vLLM collects a connector's stats from two places every engine step: the workers'
connectors (``get_kv_connector_stats`` after each forward, aggregated across TP
ranks) and the scheduler's connector (called in ``Scheduler.update_from_output``
and aggregated with the workers'). It logs ``KV Transfer metrics: ...``
periodically and hands the same dict to the connector's Prometheus metrics
(:mod:`ucm.integration.vllm.prom_metrics`). Every value is a count or a duration
*since the last report*, so aggregation is a sum and Prometheus counters add them.

Worker keys: ``loaded_blocks``, ``failed_blocks``, ``saved_blocks``,
``failed_saves``, ``load_bytes``, ``save_bytes``, ``load_seconds``,
``save_seconds``, and the Blend agent's ``reusable_tokens``, ``recomputed_tokens``,
``blend_fallbacks``. Scheduler keys (per finished request): ``requests``,
``prompt_tokens``, ``prefix_hit_tokens``, ``chunk_hit_tokens``, ``chunk_tokens``,
``blend_decision_blend`` / ``blend_decision_plain``. The two sides never report a
key in common, so an engine whose scheduler and worker share a process counts
nothing twice.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from ucm.engine import stats as stats_registry

TIME_KEYS = frozenset({"load_seconds", "save_seconds"})  # durations, reported only beside a count
DECISION_PREFIX = "blend_decision_"  # + "blend" | "plain": the pay policy's decision per request


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
        for key in ("load_seconds", "save_seconds"):
            if key in out:
                out[key] = round(out[key], 6)
        reusable = self.data.get("reusable_tokens", 0)
        if reusable:
            out["recompute_ratio"] = round(self.data.get("recomputed_tokens", 0) / reusable, 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class ConnectorCounters:
    """One connector's running counters and what it last reported.

    The connector feeds it (timed load/save calls on a worker, finished requests on
    the scheduler) and asks :meth:`take` once a step for the delta since the last
    report, as :class:`UcmConnectorStats` or None when nothing changed.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._pending: dict[str, float] = {}
        self._reported: tuple[int, ...] = (0, 0, 0, 0)  # the worker's block counters last folded in

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            if value:
                self._pending[name] = self._pending.get(name, 0) + value

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``name`` (seconds), even if it raises."""
        began = self._clock()
        try:
            yield
        finally:
            self.add(**{name: self._clock() - began})

    def request_finished(self, summary: dict[str, int], decision: dict[str, Any]) -> None:
        """A finished request's plan counts (``ReusePlan.summary``) and pay decision."""
        self.add(requests=1, **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
        chosen = decision.get("blend_decision")
        if chosen:
            self.add(**{DECISION_PREFIX + str(chosen): 1})

    def observe_worker(self, worker_side: Any) -> None:
        """Fold in the worker's running block counters (and their bytes) since the last call."""
        saver = worker_side.saver
        counts = (worker_side.stats.loaded_blocks, worker_side.stats.failed_blocks, saver.saved_blocks,
                  saver.failed_saves)
        if counts == self._reported:  # most steps (decode) move no block
            return
        delta = dict(zip(("loaded_blocks", "failed_blocks", "saved_blocks", "failed_saves"),
                         (now - before for now, before in zip(counts, self._reported))))
        self._reported = counts
        block_bytes = saver.block_nbytes
        self.add(**delta, load_bytes=delta["loaded_blocks"] * block_bytes,
                 save_bytes=delta["saved_blocks"] * block_bytes)

    def take(self, worker_side: Optional[Any] = None) -> Optional[UcmConnectorStats]:
        """The counters since the last call (a worker's also drain the Blend agent's interval
        counters, which are process-wide: one worker connector per process)."""
        if worker_side is not None:
            self.observe_worker(worker_side)
            self.add(**stats_registry.take_interval())
        if not any(value for name, value in self._pending.items() if name not in TIME_KEYS):
            # Time alone (the empty load and save calls of a decode step) is held for the
            # next report that counts something: a stats object every step is host time
            # vLLM spends aggregating and shipping it.
            return None
        out, self._pending = self._pending, {}
        return UcmConnectorStats(data=out)
