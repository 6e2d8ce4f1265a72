"""EPIC's row choice and its step, without an engine."""

from __future__ import annotations

import pytest
import torch

from ucm.config_epic import EpicConfig
from ucm.sparse import factory
from ucm.sparse.base import UcmSparseRole
from ucm.sparse.epic.epic import Epic, EpicStep
from ucm.sparse.epic.selection import epic_rows
from ucm.sparse.rows import RequestRows


def _mask(n: int, *spans: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    for a, b in spans:
        m[a:b] = True
    return m


def _rows(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_first_k_tokens_of_each_reused_chunk_are_computed():
    # prefix 0..4 (computed), chunk A reused at 5..20, gap 21..23 (miss), chunk B reused at 24..39, suffix 40..44
    reusable = _mask(45, (5, 21), (24, 40))
    keep = epic_rows(reusable, 0, chunk_starts=(5, 24), k=3)
    assert _rows(keep) == [*range(0, 8), *range(21, 27), *range(40, 45)]


def test_k_zero_keeps_every_reused_row_and_k_at_least_the_chunk_computes_all():
    reusable = _mask(30, (4, 14), (14, 24))
    assert _rows(epic_rows(reusable, 0, (4, 14), 0)) == [*range(0, 4), *range(24, 30)]
    assert bool(epic_rows(reusable, 0, (4, 14), 10).all())
    assert bool(epic_rows(reusable, 0, (4, 14), 1000).all())


def test_positions_are_prompt_positions_across_chunked_prefill():
    # This step holds prompt positions 32..47; a chunk began at 30 (before the step) and one at 40.
    reusable = torch.ones(16, dtype=torch.bool)
    keep = epic_rows(reusable, 32, chunk_starts=(30, 40), k=4)
    assert _rows(keep) == [0, 1, 8, 9, 10, 11, 15]  # 32, 33 (of the chunk at 30), 40..43, the last row


def test_the_last_row_is_always_computed():
    assert _rows(epic_rows(torch.ones(5, dtype=torch.bool), 0, (), 0)) == [4]
    with pytest.raises(ValueError):
        epic_rows(torch.ones(5, dtype=torch.bool), 0, (), -1)


def _step(k: int, per_request: dict[str, int] | None = None) -> EpicStep:
    per_request = per_request or {}
    reqs = [RequestRows("a", 0, 20, _mask(20, (2, 18)), first_position=0, chunk_starts=(2,),
                        recompute_tokens=per_request.get("a")),
            RequestRows("b", 20, 6, torch.zeros(6, dtype=torch.bool)),  # reuses nothing
            RequestRows("c", 26, 12, _mask(12, (0, 12)), first_position=16, chunk_starts=(16, 22),
                        recompute_tokens=per_request.get("c"))]
    method = factory.create_sparse_method("EPIC", EpicConfig(chunk_end_token_id=2, recompute_tokens=k),
                                          UcmSparseRole.WORKER)
    assert isinstance(method, Epic) and method.first_reused_layer == 0
    return method.begin_step(reqs, 38)


def test_step_fixes_rows_before_layer_zero():
    step = _step(2)
    assert step.active and not step.computes_all_rows(0) and not step.is_check_layer(0)
    assert step.row_counts == {"a": 2 + 2 + 2, "b": 6, "c": 2 + 2 + 1}
    local = step.take_shrink()
    assert local is not None and step.take_shrink() is None  # taken once, before layer 0
    assert local.tolist() == [0, 1, 2, 3, 18, 19, *range(20, 26), 26, 27, 32, 33, 37]
    assert step.rows.tolist() == local.tolist()
    assert step.outcomes["a"].num_recomputed_reusable == 2 and step.outcomes["a"].num_reusable == 16
    assert step.outcomes["c"].num_recomputed_reusable == 5 and step.outcomes["b"].num_reusable == 0


def test_per_request_k_overrides_the_config():
    step = _step(2, {"a": 0, "c": 100})
    assert step.outcomes["a"].num_recomputed_reusable == 0
    assert step.outcomes["c"].num_recomputed_reusable == 12
    assert step.row_counts["a"] == 2 + 2


def test_a_step_without_reuse_is_inactive():
    method = Epic(EpicConfig(chunk_end_token_id=2), UcmSparseRole.WORKER)
    step = method.begin_step([RequestRows("b", 0, 6, torch.zeros(6, dtype=torch.bool))], 6)
    assert not step.active and step.computes_all_rows(0) and step.take_shrink() is None
    assert method.end_step() is step and method.end_step() is None
