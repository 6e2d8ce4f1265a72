"""ucm's counters as vLLM KV-connector stats: aggregation across workers and steps."""

from ucm.engine import stats
from ucm.integration.vllm.connector_stats import UcmConnectorStats


def test_interval_counters_reset_after_take():
    stats.take_interval()
    stats.record_step("req-x", num_reusable=100, num_recomputed=15)
    stats.add_interval(loaded_blocks=3)
    assert stats.take_interval() == {"reusable_tokens": 100, "recomputed_tokens": 15, "loaded_blocks": 3}
    assert stats.take_interval() == {}
    assert stats.request_stats("req")["recompute_ratio"] == 0.15  # the caller's id without vLLM's suffix


def _stats(data: dict) -> UcmConnectorStats:
    return UcmConnectorStats(data=dict(data))


def test_aggregate_and_reduce():
    a = _stats({"reusable_tokens": 100, "recomputed_tokens": 10, "loaded_blocks": 4})
    b = _stats({"reusable_tokens": 300, "recomputed_tokens": 50})
    total = a.aggregate(b)
    assert total.reduce() == {"reusable_tokens": 400, "recomputed_tokens": 60, "loaded_blocks": 4,
                              "recompute_ratio": 0.15}
    assert not total.is_empty()
    assert _stats({"loaded_blocks": 0}).is_empty()
