"""Blend's "boundary" selection: each reused chunk's first tokens (EPIC's choice), then the
rest of the same budget by KV deviation (CacheBlend's), on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from ucm.config import BlendConfig, UcmConfig
from ucm.config_checks import UcmConfigError
from ucm.engine.scheduler_side import request_selection
from ucm.sparse.blend.blend import Blend, BlendStep
from ucm.sparse.rows import RequestRows

HEADS, DIM = 2, 4
# 20 rows: 0..1 a prefix (not reusable), 2..9 and 10..17 two reused chunks, 18..19 the question.
CHUNK_STARTS = (2, 10)
REUSABLE = torch.zeros(20, dtype=torch.bool)
REUSABLE[2:18] = True


def _step(selection: str, ratios: dict[int, float], boundary_tokens: int = 1,
          per_request: str | None = None) -> BlendStep:
    req = RequestRows("r", 0, 20, REUSABLE.clone(), selection=per_request, first_position=0,
                      chunk_starts=CHUNK_STARTS, suffix_start=18)
    return BlendStep([req], 20, ratios, selection=selection, boundary_tokens=boundary_tokens)


def _kv(deviating: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    fresh = torch.zeros(20, HEADS, DIM)
    cached = fresh.clone()
    for row, amount in deviating.items():
        cached[row] += amount
    return fresh, cached


# Rows 5, 13 deviate most, then 6, 14; the chunks' first rows (2, 10) deviate least.
DEVIATING = {5: 4.0, 13: 3.5, 6: 3.0, 14: 2.5, 3: 0.5, 11: 0.4}


def _kept_reused(step: BlendStep, layer: int = 1) -> list[int]:
    fresh, cached = _kv(DEVIATING)
    mask = step.select(layer, fresh, cached)
    step.take_shrink()
    return [i for i in torch.nonzero(mask).flatten().tolist() if REUSABLE[i]]


def test_deviation_keeps_the_top_deviating_rows():
    assert _kept_reused(_step("deviation", {1: 0.25})) == [5, 6, 13, 14]  # 4 of 16


def test_boundary_keeps_each_chunks_first_rows_then_the_top_deviating_within_the_same_budget():
    step = _step("boundary", {1: 0.25})
    assert _kept_reused(step) == [2, 5, 10, 13]  # 2 boundary rows + the 2 most deviating
    assert step.outcomes["r"].num_recomputed_reusable == 4  # the budget deviation spends


def test_boundary_rows_are_capped_at_the_budget_split_over_the_chunks():
    step = _step("boundary", {1: 0.25}, boundary_tokens=8)  # 8 a chunk would be all 16 rows
    assert _kept_reused(step) == [2, 3, 10, 11]  # budget 4 over 2 chunks: 2 each
    assert step.outcomes["r"].num_recomputed_reusable == 4


def test_boundary_zero_tokens_is_deviation():
    assert _kept_reused(_step("boundary", {1: 0.25}, boundary_tokens=0)) == [5, 6, 13, 14]


def test_a_request_may_ask_for_boundary():
    assert _kept_reused(_step("deviation", {1: 0.25}, per_request="boundary")) == [2, 5, 10, 13]
    assert request_selection({"ucm_blend_selection": "boundary"}) == "boundary"


def test_gradual_filtering_keeps_the_boundary_rows_at_every_check():
    # Capped by the final budget (ceil(0.125 * 16) = 2: one a chunk); the first check spends
    # its larger budget (ceil(0.5 * 16) = 8) on them plus the 6 most deviating rows.
    step = _step("boundary", {1: 0.5, 2: 0.125}, boundary_tokens=4)
    fresh, cached = _kv(DEVIATING)
    first = step.select(1, fresh, cached)
    assert [i for i in torch.nonzero(first).flatten().tolist() if REUSABLE[i]] == [2, 3, 5, 6, 10, 11, 13, 14]
    local = step.take_shrink()
    second = step.select(2, fresh[step.rows], cached[step.rows])
    kept = step.rows[torch.nonzero(second).flatten()].tolist()
    assert [i for i in kept if REUSABLE[i]] == [2, 10]
    assert local is not None and step.outcomes["r"].num_recomputed_reusable == 2


def test_config_key_and_selection():
    config = UcmConfig.from_dict({"ucm_sparse_config": {"Blend": {
        "chunk_end_token_id": 2, "selection": "boundary", "boundary_tokens": 8}}})
    assert config.blend.selection == "boundary" and config.blend.boundary_tokens == 8
    assert BlendConfig(chunk_end_token_id=2).boundary_tokens == 16
    assert BlendConfig.from_dict(config.blend.to_dict()) == config.blend
    with pytest.raises(UcmConfigError, match="Blend.boundary_tokens"):
        UcmConfig.from_dict({"ucm_sparse_config": {"Blend": {"chunk_end_token_id": 2, "boundary_tokens": -1}}})
    blend = Blend(config.blend, "worker")
    step = blend.begin_step([RequestRows("r", 0, 20, REUSABLE.clone(), chunk_starts=CHUNK_STARTS)], 20)
    assert step.selection == "boundary" and step.boundary_tokens == 8
