"""ucm's counters as vLLM connector stats and as Prometheus counters (no engine)."""

from __future__ import annotations

import re
from types import SimpleNamespace

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

from ucm.integration.vllm.connector_stats import ConnectorCounters, UcmConnectorStats
from ucm.integration.vllm.prom_metrics import UcmPromMetrics

TYPES = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}


def _metrics() -> UcmPromMetrics:
    return UcmPromMetrics(SimpleNamespace(kv_transfer_config=None), TYPES, ["model_name", "engine"],
                          {0: ["m", "0"], 1: ["m", "1"]})


def _value(name: str, **labels: str) -> float:
    text = generate_latest(REGISTRY).decode()
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        got = dict(kv.split("=", 1) for kv in m.group(1).split(","))
        if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics:\n{text}")


def test_scheduler_and_worker_counters_reach_prometheus_counters():
    prom = _metrics()
    sched, worker = ConnectorCounters(), ConnectorCounters()
    sched.request_finished({"prompt_tokens": 300, "prefix_hit_tokens": 32, "chunk_hit_tokens": 160,
                            "chunk_tokens": 200}, {"blend_decision": "blend", "blend_reason": "pays"})
    sched.request_finished({"prompt_tokens": 100, "prefix_hit_tokens": 0, "chunk_hit_tokens": 0,
                            "chunk_tokens": 0}, {})
    worker.add(reusable_tokens=160, recomputed_tokens=24, loaded_blocks=5, load_bytes=5 * 4096, load_seconds=0.25)
    step = worker.take().aggregate(sched.take())  # vLLM's scheduler aggregates both sides
    prom.observe(step.data, engine_idx=1)
    prom.observe({"chunk_hit_tokens": 16, "blend_decision_plain": 1}, engine_idx=1)
    assert _value("ucm_chunk_hit_tokens_total", engine="1") == 176
    assert _value("ucm_prefix_hit_tokens_total", engine="1") == 32
    assert _value("ucm_requests_total", engine="1") == 2
    assert _value("ucm_recomputed_tokens_total", engine="1") == 24
    assert _value("ucm_reused_tokens_total", engine="1") == 136
    assert _value("ucm_load_bytes_total", engine="1") == 5 * 4096
    assert _value("ucm_load_seconds_total", engine="1") == 0.25
    assert _value("ucm_blend_decisions_total", engine="1", decision="blend") == 1
    assert _value("ucm_blend_decisions_total", engine="1", decision="plain") == 1
    assert sched.take() is None and worker.take() is None  # deltas: reported once


def test_registering_twice_in_one_process_replaces_the_counters():
    _metrics().observe({"chunk_hit_tokens": 5})
    again = _metrics()  # a second front end's logger in the same process
    again.observe({"chunk_hit_tokens": 7})
    assert _value("ucm_chunk_hit_tokens_total", engine="0") == 7


def test_timed_counts_even_when_the_call_raises():
    ticks = iter([1.0, 1.5])
    counters = ConnectorCounters(clock=lambda: next(ticks))
    try:
        with counters.timed("save_seconds"):
            raise RuntimeError("store down")
    except RuntimeError:
        pass
    assert counters.take() is None  # time alone waits for a count to travel with
    counters.add(failed_saves=1)
    assert counters.take().data == {"save_seconds": 0.5, "failed_saves": 1}


def test_a_step_that_moved_nothing_reports_nothing():
    """Every step times its (empty) load and save calls; reporting that time alone would send
    a stats object through vLLM's stats path on every decode step. It is held and goes out
    with the next step that counts something, so no second is lost."""
    saver = SimpleNamespace(saved_blocks=0, failed_saves=0, block_nbytes=1000)
    ws = SimpleNamespace(stats=SimpleNamespace(loaded_blocks=0, failed_blocks=0), saver=saver)
    ticks = iter([0.0, 0.25, 1.0, 1.25, 2.0, 2.5])
    counters = ConnectorCounters(clock=lambda: next(ticks))
    for _ in range(2):
        with counters.timed("load_seconds"):
            pass
        assert counters.take(ws) is None
    saver.saved_blocks = 2
    with counters.timed("save_seconds"):
        pass
    assert counters.take(ws).data == {"load_seconds": 0.5, "save_seconds": 0.5, "saved_blocks": 2,
                                      "save_bytes": 2000}
    assert counters.take(ws) is None


def test_worker_block_counters_become_bytes_and_deltas():
    saver = SimpleNamespace(saved_blocks=3, failed_saves=0, block_nbytes=1000)
    ws = SimpleNamespace(stats=SimpleNamespace(loaded_blocks=2, failed_blocks=1), saver=saver)
    counters = ConnectorCounters()
    first = counters.take(ws).data
    assert {k: first[k] for k in ("loaded_blocks", "load_bytes", "saved_blocks", "save_bytes", "failed_blocks")} == \
        {"loaded_blocks": 2, "load_bytes": 2000, "saved_blocks": 3, "save_bytes": 3000, "failed_blocks": 1}
    saver.saved_blocks = 4
    assert counters.take(ws).data == {"saved_blocks": 1, "save_bytes": 1000}
    assert UcmConnectorStats(data={"load_seconds": 0.1234567}).reduce() == {"load_seconds": 0.123457}
