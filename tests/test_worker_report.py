"""The worker -> scheduler report of private-tier keys, as vLLM aggregates it over TP ranks."""

from __future__ import annotations

from types import SimpleNamespace

from ucm.integration.vllm.metadata import UcmWorkerReport
from ucm.store.journal import HeldKeys


def test_reports_of_two_ranks_add_up_and_a_foreign_report_is_ignored():
    rank0 = UcmWorkerReport(added=[b"a@0"], dropped=[b"z@0"])
    rank1 = UcmWorkerReport(added=[b"a@1"], dropped=[])
    merged = rank0.aggregate(rank1)
    assert merged.added == [b"a@0", b"a@1"] and merged.dropped == [b"z@0"]
    assert merged.aggregate(SimpleNamespace()) is merged


def test_scheduler_counts_reported_keys_as_stored():
    from ucm.config import UcmConfig
    from ucm.hashing import HashContext, rank_key
    from ucm.engine.scheduler_side import SchedulerSide
    from ucm.store.dram_store import UcmDramStore

    side = SchedulerSide(UcmConfig.from_dict({}), UcmDramStore(capacity_bytes=1 << 16),
                         HashContext(model_id="m", kv_dtype="f32", tp_size=2), 16, 2, None)
    assert side._exists([b"k"]) == [False]
    side.held.update([rank_key(b"k", 0)], [])
    assert side._exists([b"k"]) == [False]  # rank 1's shard is missing
    side.held.update([rank_key(b"k", 1)], [])
    assert side._exists([b"k"]) == [True]
    side.held.update([], [rank_key(b"k", 0)])
    assert side._exists([b"k"]) == [False]
