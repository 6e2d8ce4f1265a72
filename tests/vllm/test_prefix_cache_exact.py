"""vLLM's own prefix cache (on by default) must never serve Blend's approximate KV as exact.

A blended request leaves approximate KV in its paged blocks. vLLM caches full blocks
under hashes of their tokens, so a later request with the same token prefix would take
that KV as if it had been computed in full. These tests run with prefix caching on and
32-token vLLM blocks (so prompts span many cacheable blocks) and check that every
request gets what it would get alone.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=3)
A = RAG.prompt([2, 0, 1], 0)
B = RAG.prompt([2, 0], 1)          # shares A's prefix up to the end of chunk 0
C = RAG.prompt([2, 0, 1], 2)       # shares all of A but the question
ENGINE = {"enable_prefix_caching": True, "block_size": 32}
PRECOMPUTE = {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2]), "max_tokens": 1}


def _one(name: str, ids: list[int], ratio: float | None = None) -> dict:
    item = {"ids": ids}
    if ratio is not None:
        item["ratio"] = ratio
    return {"op": "generate", "name": name, "prompts": [item], "batch": False}


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    """vLLM alone, with its prefix cache on: the reference for every request."""
    spec = {"model": llama, "engine": ENGINE, "ucm": None,
            "actions": [_one("A", A), _one("B", B), _one("C", C)]}
    return run_engine(spec, tmp_path_factory.mktemp("plain_pc"), enable_sparse=False)


@pytest.fixture(scope="module")
def blended(llama, tmp_path_factory):
    """Approximate requests first, then exact ones over the same prefixes, then the other order."""
    spec = {"model": llama, "engine": ENGINE, "ucm": blend_config(1.0), "actions": [
        PRECOMPUTE,
        _one("A_zero", A, 0.0), _one("A_one", A, 1.0),
        _one("B_one", B, 1.0), _one("C_plain_after_blend", C, 1.0),
        _one("A_mid", A, 0.15), _one("A_mid_again", A, 0.15),
        _one("B_zero", B, 0.0), _one("B_one_again", B, 1.0),
    ]}
    return run_engine(spec, tmp_path_factory.mktemp("blend_pc"))


def test_ratio_one_after_a_blend_equals_full_prefill(plain, blended):
    assert blended["A_zero"][0]["stats"]["reusable_tokens"] > 100  # A really was blended first
    assert_same(blended["A_one"], plain["A"])
    assert_same(blended["B_one_again"], plain["B"])


def test_request_sharing_a_blended_prefix_gets_what_it_gets_alone(plain, blended):
    assert_same(blended["B_one"], plain["B"])
    assert_same(blended["C_plain_after_blend"], plain["C"])


def test_same_ratio_twice_is_idempotent(blended):
    assert_same(blended["A_mid_again"], blended["A_mid"], tol=1e-6)
    # ...and it really is a blend, not a full prefill in disguise.
    assert blended["A_mid"][0]["stats"]["recompute_ratio"] < 1.0


def test_blend_then_exact_prefix_blocks_still_shared(blended):
    """Blocks before the first reused chunk token are exact: they may still be shared
    through vLLM's prefix cache, so a blended request is not made slower than it must be.
    (The second request's prefix hit shows as local prefix cache, not ucm prefix hits.)"""
    assert blended["A_one"][0]["stats"]["chunk_hit_tokens"] > 0
