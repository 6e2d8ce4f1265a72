"""Tiered store: fastest tier first (DRAM), slower and shared tiers after (files).

The connector sees one store. Reads come from the fastest tier holding a
block and promote it into the faster tiers, so a block read once from NFS is
a memory hit next time; writes go through to every tier, so the shared file
tier always has what this instance computed (other instances depend on it).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from ucm.store.base import (
    KVStoreBase,
    StoreError,
    StoreStats,
    Task,
    check_keys,
    check_layout,
    check_tensors,
)
from ucm.store.journal import KeyJournal

logger = logging.getLogger(__name__)


class UcmPipelineStore(KVStoreBase):
    """Compose stores in order, ``tiers[0]`` being the fastest.

    Coordination (waiting on one tier before asking the next) runs in a small
    private thread pool, separate from the tiers' own I/O pools, so it can
    block without starving them.
    """

    def __init__(self, tiers: Sequence[KVStoreBase], coordinator_threads: int = 4) -> None:
        if not tiers:
            raise ValueError("UcmPipelineStore needs at least one tier")
        for tier in tiers:
            if not isinstance(tier, KVStoreBase):
                raise TypeError(f"pipeline tiers must be KVStoreBase, got {type(tier).__name__}")
        self.tiers: List[KVStoreBase] = list(tiers)
        self._closed = False
        self._stats = StoreStats(("hits", "misses", "promotions", "promotion_errors", "tier_errors"))
        self._stats_per_tier = StoreStats(tuple(f"hits_tier{i}" for i in range(len(self.tiers))))
        self._pool = cf.ThreadPoolExecutor(max_workers=coordinator_threads, thread_name_prefix="ucm-pipeline")

    def lookup(self, keys: Sequence[bytes]) -> List[bool]:
        """Present in any tier; slower tiers are asked only about keys still missing."""
        keys = check_keys(keys)
        found = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, hit in enumerate(found) if not hit]
            if not todo:
                break
            for i, hit in zip(todo, tier.lookup([keys[i] for i in todo])):
                found[i] = found[i] or hit
        return found

    def load(self, keys: Sequence[bytes], layout: str) -> Task:
        """Fill each key from the first tier that returns it, promoting into faster tiers.

        A tier whose load fails is skipped (counted in ``tier_errors``, logged):
        its blocks become misses while other tiers' hits are still returned.
        Dumps, in contrast, report tier failures, so a broken tier is not silent.
        """
        keys = check_keys(keys)
        layout = check_layout(layout)
        return self._submit(self._load_chain, keys, layout, description=f"pipeline load of {len(keys)} blocks")

    def dump(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], layout: str) -> Task:
        """Write through to every tier; the result is the largest per-tier count written.

        Every tier is attempted even if one fails; the task then fails with
        all tier errors in its message.
        """
        keys = check_keys(keys)
        layout = check_layout(layout)
        check_tensors(keys, tensors)
        return self._submit(
            self._dump_all, keys, list(tensors), layout, description=f"pipeline dump of {len(keys)} blocks"
        )

    def _submit(self, fn: Any, *args: Any, description: str) -> Task:
        if self._closed:
            return Task.failed(StoreError("UcmPipelineStore is closed"), description)
        try:
            fut = self._pool.submit(fn, *args)
        except RuntimeError:
            return Task.failed(StoreError("UcmPipelineStore is closed"), description)
        return Task([fut], lambda results: results[0], description)

    def _load_chain(self, keys: List[bytes], layout: str) -> List[Optional[torch.Tensor]]:
        out: List[Optional[torch.Tensor]] = [None] * len(keys)
        for level, tier in enumerate(self.tiers):
            todo = [i for i, t in enumerate(out) if t is None]
            if not todo:
                break
            # Ask only about blocks this tier claims to have, so a miss costs a stat, not a read.
            present = tier.lookup([keys[i] for i in todo])
            todo = [i for i, hit in zip(todo, present) if hit]
            if not todo:
                continue
            try:
                results = tier.wait(tier.load([keys[i] for i in todo], layout))
            except StoreError as exc:
                # A broken tier must not cost the hits other tiers can still serve;
                # its blocks become misses (recomputed), and the error is logged.
                self._stats.incr("tier_errors")
                logger.warning("load from tier %d (%s) failed: %s", level, type(tier).__name__, exc)
                continue
            got = [(i, t) for i, t in zip(todo, results) if t is not None]
            for i, tensor in got:
                out[i] = tensor
            if got:
                self._stats_per_tier.incr(f"hits_tier{level}", len(got))
            if got and level > 0:
                self._promote(level, [keys[i] for i, _ in got], [t for _, t in got], layout)
        hits = sum(t is not None for t in out)
        self._stats.incr("hits", hits)
        self._stats.incr("misses", len(keys) - hits)
        return out

    def _promote(self, level: int, keys: List[bytes], tensors: List[torch.Tensor], layout: str) -> None:
        """Copy hits from tier ``level`` into all faster tiers; failures only cost a future hit."""
        for faster in self.tiers[:level]:
            try:
                written = faster.wait(faster.dump(keys, tensors, layout))
                self._stats.incr("promotions", written)
            except StoreError as exc:
                self._stats.incr("promotion_errors")
                logger.warning("promotion into %s failed: %s", type(faster).__name__, exc)

    def _dump_all(self, keys: List[bytes], tensors: List[torch.Tensor], layout: str) -> int:
        # Start every tier's dump before waiting on any, so tiers write in parallel.
        tasks = []
        errors: List[str] = []
        for tier in self.tiers:
            try:
                tasks.append((tier, tier.dump(keys, tensors, layout)))
            except (StoreError, ValueError, TypeError) as exc:
                errors.append(f"{type(tier).__name__}: {exc}")
        written = 0
        for tier, task in tasks:
            try:
                written = max(written, tier.wait(task))
            except StoreError as exc:
                errors.append(f"{type(tier).__name__}: {exc}")
        if errors:
            raise StoreError("pipeline dump failed in " + "; ".join(errors))
        return written

    def reserve(self, block_nbytes: int, in_flight_blocks: int = 0, stage_blocks: int = 1) -> None:
        for tier in self.tiers:
            tier.reserve(block_nbytes, in_flight_blocks, stage_blocks)

    def lend_blocks(self, count: int, shape: Sequence[int], dtype: torch.dtype) -> Optional[List[torch.Tensor]]:
        """The fastest tier's lent blocks: a dump writes them through to the slower tiers."""
        return self.tiers[0].lend_blocks(count, shape, dtype)

    def return_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        self.tiers[0].return_blocks(blocks)

    def attach_journal(self, journal: KeyJournal) -> bool:
        """Every private tier reports to the journal. A key dropped by the host-memory tier
        but still in a shared file tier reads as dropped, which only costs the scheduler's
        view of it; the scheduler still finds it through its own lookup of the files."""
        attached = [tier.attach_journal(journal) for tier in self.tiers]
        return any(attached)

    def close(self) -> None:
        """Stop coordinating, then close every tier (each finishes its queued I/O)."""
        self._closed = True
        self._pool.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def stats(self) -> Dict[str, Any]:
        """Pipeline counters, per-tier hit counts, and each tier's own stats as ``tierN.name``."""
        out: Dict[str, Any] = dict(self._stats.snapshot())
        out.update(self._stats_per_tier.snapshot())
        for level, tier in enumerate(self.tiers):
            for name, value in tier.stats().items():
                out[f"tier{level}.{name}"] = value
        return out
