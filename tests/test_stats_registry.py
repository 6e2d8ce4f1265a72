"""The per-request stats registry: bounded, and found by either request id."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ucm.engine import stats
from ucm.engine.stats import StatsRegistry


def plan(tokens: int = 10, chunk_hit: int = 0) -> SimpleNamespace:
    """A stand-in for a ReusePlan: its counts and the summary the registry records."""
    counts = dict(prompt_tokens=tokens, prefix_hit_tokens=0, chunk_hit_tokens=chunk_hit, chunk_tokens=8)
    return SimpleNamespace(num_tokens=tokens, prefix_hit_tokens=0, chunk_hit_tokens=chunk_hit, num_chunk_tokens=8,
                           summary=lambda: dict(counts))


def test_capacity_is_respected_and_the_least_recently_written_go_first():
    reg = StatsRegistry(capacity=3)
    for i in range(3):
        reg.record_plan(f"r{i}-x", plan(tokens=i + 1))
    reg.record_step("r0-x", 4, 1)  # r0 written again: now the newest
    reg.record_plan("r3-x", plan(tokens=4))
    assert len(reg) == 3
    assert reg.get("r1-x") == {} and reg.get("r1") == {}  # the oldest, dropped with its caller id
    assert reg.get("r0-x")["prompt_tokens"] == 1 and reg.get("r0-x")["reusable_tokens"] == 4
    assert [reg.get(f"r{i}")["prompt_tokens"] for i in (0, 2, 3)] == [1, 3, 4]


def test_lookup_by_internal_and_caller_id_give_the_same_merged_record():
    reg = StatsRegistry(capacity=10)
    reg.record_plan("cmpl-7-0-ab12", plan(tokens=30, chunk_hit=16))
    reg.record_step("cmpl-7-0-ab12", 16, 4)
    by_internal, by_caller = reg.get("cmpl-7-0-ab12"), reg.get("cmpl-7-0")
    assert by_internal == by_caller
    assert by_caller["chunk_hit_tokens"] == 16 and by_caller["recompute_ratio"] == 0.25
    assert reg.get("cmpl-7") == {} and reg.get("unknown") == {}


def test_a_caller_id_reused_finds_its_newest_request_and_survives_the_old_ones_drop():
    reg = StatsRegistry(capacity=2)
    reg.record_plan("q-aaaa", plan(tokens=1))
    reg.record_plan("q-bbbb", plan(tokens=2))
    assert reg.get("q")["prompt_tokens"] == 2
    reg.record_plan("other-cccc", plan(tokens=3))  # drops q-aaaa: the index still points at q-bbbb
    assert reg.get("q")["prompt_tokens"] == 2 and reg.get("q-aaaa") == {}


def test_an_id_without_a_suffix_is_found_as_is():
    reg = StatsRegistry(capacity=2)
    reg.record_step("plain", 3, 3)
    assert reg.get("plain")["reused_tokens"] == 0


def test_records_are_copies_and_clear_empties():
    reg = StatsRegistry(capacity=2)
    reg.record_plan("a-1", plan())
    reg.get("a-1")["prompt_tokens"] = -1
    assert reg.get("a")["prompt_tokens"] == 10
    reg.clear()
    assert len(reg) == 0 and reg.get("a") == {}


def test_capacity_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        StatsRegistry(capacity=0)


def test_the_process_registry_is_bounded_at_ten_thousand_records():
    stats.clear()
    try:
        for i in range(10_001):
            stats.record_plan(f"req{i}-s", plan(tokens=i + 1))
        assert stats.request_stats("req0") == {} and stats.request_stats("req0-s") == {}
        assert stats.request_stats("req1")["prompt_tokens"] == 2
        assert stats.request_stats("req10000")["prompt_tokens"] == 10_001
    finally:
        stats.clear()
