"""Blend's stats count as reused only rows that kept their cached KV.

A forward whose check layer never runs (a layer index past the model, now refused at
start) recomputes every row with the engine's own path; the stats used to say every
reusable row was reused (recompute_ratio 0.0) because an outcome began at "nothing
recomputed" and only a check layer's selection changed it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ucm.config import BlendConfig, CheckLayer
from ucm.engine import stats
from ucm.integration.vllm.blend_agent import VllmBlendAgent
from ucm.sparse.base import UcmSparseRole
from ucm.sparse.blend.blend import Blend, RequestRows


def _blend(ratios: dict[int, float]) -> Blend:
    cfg = BlendConfig(chunk_end_token_id=2, check_layers=tuple(
        CheckLayer(i, f"model.layers.{i}.self_attn.attn", r) for i, r in ratios.items()))
    return Blend(cfg, UcmSparseRole.WORKER)


def _requests() -> list[RequestRows]:
    reusable = torch.tensor([False, True, True, True, True, False])  # 4 reusable rows
    return [RequestRows("req-a", 0, 6, reusable)]


def test_outcome_before_any_check_layer_is_all_recomputed() -> None:
    step = _blend({3: 0.25}).begin_step(_requests(), 6)
    outcome = step.outcomes["req-a"]
    assert outcome.num_reusable == 4
    assert outcome.num_recomputed_reusable == 4  # layers before the check compute every row
    assert outcome.recompute_fraction == 1.0


def _agent(method: Blend) -> VllmBlendAgent:
    worker = SimpleNamespace(defer_chunk_loads=False, wait_loads=lambda: None)
    return VllmBlendAgent(method, worker, metadata=lambda: None)  # type: ignore[arg-type]


def test_stats_of_a_forward_whose_check_layer_never_ran_say_nothing_was_reused() -> None:
    stats.clear()
    method = _blend({3: 0.25})
    agent = _agent(method)
    method.begin_step(_requests(), 6)
    agent.execute_finished(torch.tensor([5]))  # layers 0..2 ran; the check layer was never reached
    record = stats.request_stats("req-a")
    assert record["reusable_tokens"] == 4
    assert record["recomputed_reused_tokens"] == 4
    assert record["reused_tokens"] == 0 and record["recompute_ratio"] == 1.0
    stats.clear()


def test_stats_of_a_forward_whose_check_layer_ran_count_its_selection() -> None:
    """A valid check layer: the stats report exactly the selection's reused rows."""
    stats.clear()
    method = _blend({1: 0.5})
    agent = _agent(method)
    step = method.begin_step(_requests(), 6)
    cached = torch.zeros(6, 2, 4)
    cached[2], cached[4] = 5.0, 1.0  # rows 2 and 4 deviate most: the 2 of 4 reusable rows kept
    keep = step.select(1, torch.zeros(6, 2, 4), cached)
    assert keep.tolist() == [True, False, True, False, True, True]
    agent.execute_finished(torch.tensor([5]))
    record = stats.request_stats("req-a")
    assert record["reusable_tokens"] == 4 and record["recomputed_reused_tokens"] == 2
    assert record["reused_tokens"] == 2 and record["recompute_ratio"] == 0.5
    stats.clear()


def test_vllms_dummy_forwards_are_not_timed_for_the_pay_policy() -> None:
    """A forward without requests (a dummy run: vLLM 0.26 and 0.32 call the model directly
    for theirs, but a runner that went through the patched model call would) carries one-time
    costs and no request: it must not price a plain prefill. A forward of requests is timed."""
    from ucm.integration.vllm.blend_agent import BatchInfo

    agent = _agent(_blend({1: 0.5}))
    agent.execute_begin(BatchInfo([], torch.arange(512)))  # a dummy run of 512 rows
    agent.execute_finished(torch.empty(0))
    assert agent.timer.take() == []
    agent.execute_begin(BatchInfo(["req-a"], torch.arange(512)))  # a real prefill of 512 rows
    agent.execute_finished(torch.empty(0))
    assert [s.rows for s in agent.timer.take()] == [512]
