"""Query-aware selection in Blend (selection: "query" | "mixed"), on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from ucm.sparse.blend.blend import BlendStep
from ucm.sparse.blend.selection import descending_ranks, mixed_score, query_attention
from ucm.sparse.rows import RequestRows

HEADS, KV_HEADS, DIM = 4, 2, 8


def _qk(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, HEADS, DIM, generator=g) * 0.1, torch.randn(rows, KV_HEADS, DIM, generator=g) * 0.1)


def test_the_row_the_question_attends_to_scores_highest():
    q, k = _qk(10)
    k[3] = 5.0  # every head's key of row 3 ...
    q[8:] = 5.0  # ... matches the question's (rows 8, 9) queries
    score = query_attention(q, k, num_queries=2, scale=DIM ** -0.5)
    assert int(score.argmax()) == 3
    assert score.shape == (10,) and score.sum().item() == pytest.approx(2 * HEADS, rel=1e-5)  # 2 rows x heads


def test_the_question_sees_no_later_row_and_no_question_means_zeros():
    q, k = _qk(6)
    score = query_attention(q, k, num_queries=2, scale=1.0)
    # Row 4 (first question row) cannot see row 5; row 5 sees all: rows 0..4 get both rows' mass.
    single = query_attention(q[:5], k[:5], num_queries=1, scale=1.0)
    last = query_attention(q, k, num_queries=1, scale=1.0)
    torch.testing.assert_close(score, torch.cat([single, torch.zeros(1)]) + last)
    assert not query_attention(q, k, 0, 1.0).any()


def test_mixed_ranks_by_the_sum_of_both_ranks():
    candidates = torch.tensor([True, True, True, True, False])
    deviation = torch.tensor([4.0, 3.0, 2.0, 1.0, 100.0])  # ranks 0 1 2 3
    attention = torch.tensor([0.0, 0.5, 0.4, 0.9, 100.0])  # ranks 3 1 2 0
    assert descending_ranks(deviation, candidates)[:4].tolist() == [0, 1, 2, 3]
    score = mixed_score(deviation, attention, candidates)
    assert int(score[:4].argmax()) == 1  # 1 + 1: best on both on average


def _step(selection: str, per_request: str | None = None, suffix: bool = True) -> BlendStep:
    # 12 rows: 0..1 prefix (not reusable), 2..9 a reused chunk, 10..11 the question.
    reusable = torch.zeros(12, dtype=torch.bool)
    reusable[2:10] = True
    req = RequestRows("r", 0, 12, reusable, selection=per_request, first_position=0,
                      suffix_start=10 if suffix else None)
    return BlendStep([req], 12, {1: 0.125}, selection=selection)  # keeps 1 of the 8 reused rows


def _inputs() -> tuple[torch.Tensor, ...]:
    q, fresh_k = _qk(12, seed=1)
    cached_k = fresh_k.clone()
    cached_k[5] += 1.0  # row 5 deviates most
    fresh_k[7] = 3.0  # the question attends to row 7 (its key, fresh and cached, matches)
    cached_k[7] = 3.0
    q[10:] = 3.0
    return q, fresh_k, cached_k


def _kept(step: BlendStep) -> list[int]:
    q, fresh_k, cached_k = _inputs()
    mask = step.select(1, fresh_k, cached_k, query=q, scale=DIM ** -0.5)
    return [i for i in torch.nonzero(mask).flatten().tolist() if 2 <= i < 10]


def test_query_selection_keeps_the_token_the_question_attends_to():
    assert _kept(_step("deviation")) == [5]
    assert _kept(_step("query")) == [7]


def test_a_request_chooses_its_own_ranking():
    assert _kept(_step("deviation", per_request="query")) == [7]
    assert _kept(_step("query", per_request="deviation")) == [5]


def test_without_the_question_in_the_step_query_ranks_by_deviation():
    assert _kept(_step("query", suffix=False)) == [5]


def test_one_all_reduce_carries_deviation_and_attention():
    calls = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t * 2  # two ranks with the same numbers

    step = _step("mixed")
    step.all_reduce = all_reduce
    _kept(step)
    assert calls == [(2, 12)]
