"""After start, a failing Blend step never takes the engine down: the batch runs again
as a plain prefill, the cause is logged once, and the fallback is counted.

Faults are injected in the engine process (tests/engine_runner.py ``faults``): the
first row selection raises (a check layer, before any row was dropped), and later the
second exact-mask attention call (the layer after a check layer, rows already
dropped). Every request asks ratio 0 (reuse all it can), so a request that was
blended differs from its full prefill and one that fell back equals it.
"""

from __future__ import annotations

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=2)
ORDERS = ([3, 1, 0, 2], [2, 0, 3, 1], [1, 3, 2, 0])  # own prompts: no whole-prompt prefix hits


def test_a_failing_blend_step_falls_back_to_a_plain_prefill(tiny_models, tmp_path):
    prompts = [RAG.prompt(order, 2) for order in ORDERS]
    spec = {"model": str(tiny_models["llama"]), "ucm": blend_config(0.0), "faults": [
        {"target": "ucm.sparse.blend.blend:BlendStep.select", "fail_on_call": 1},
        {"target": "ucm.integration.vllm.blend_agent:VllmBlendAgent._attend", "fail_on_call": 2},
    ], "actions": [
        {"op": "generate", "name": "reference", "prompts": [{"ids": p, "salt": "reference"} for p in prompts]},
        {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2, 3]), "max_tokens": 1},
        {"op": "generate", "name": "blend", "batch": False, "prompts": [{"ids": p, "ratio": 0.0} for p in prompts]},
        {"op": "totals", "name": "totals"},
    ]}
    out = run_engine(spec, tmp_path)
    reference, blend = out["reference"], out["blend"]
    failed_select, failed_attention, blended = blend
    for fell_back, want in ((failed_select, reference[0]), (failed_attention, reference[1])):
        stats = fell_back["stats"]
        assert stats["chunk_hit_tokens"] > 0 and stats["blend_fallbacks"] == 1
        assert stats["recompute_ratio"] == 1.0 and stats["reused_tokens"] == 0
        assert_same([fell_back], [want])
    # The engine goes on blending after the fallbacks.
    assert blended["stats"]["recompute_ratio"] == 0.0 and "blend_fallbacks" not in blended["stats"]
    assert max(abs(p - q) for p, q in zip(blended["logprobs"], reference[2]["logprobs"])) > 1e-3
    assert out["totals"][0]["blend_fallbacks"] == 2
