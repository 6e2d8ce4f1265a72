"""New weights written at the same model path must not be served the old weights' KV.

The store keys once named the model by its path only: after the weights at that path were
replaced, a prompt cached on the old weights came back as exact prefix hits and the output
was wrong. The keys now carry a fingerprint of the weight files (tests/test_model_identity.py).
"""

from __future__ import annotations

import shutil

from tests.tiny_models import build_tiny_model
from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same
from ucm.model_identity import safetensors_header

RAG = Rag(seed=5)
STORED = RAG.prompt([0, 1, 2], 0)


def _spec(model: str, store, prompts: list[list[int]], precompute: bool = False) -> dict:
    actions = []
    if precompute:
        actions.append({"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2]),
                        "max_tokens": 1})
    actions.append({"op": "generate", "name": "gen", "prompts": [{"ids": p} for p in prompts], "batch": False})
    return {"model": model, "engine": {"enable_prefix_caching": False},
            "ucm": None if store is None else blend_config(1.0, store), "actions": actions}


def test_new_weights_at_the_same_path_miss_the_old_kv(tmp_path):
    model = build_tiny_model("llama", tmp_path / "models", seed=0)
    store = tmp_path / "store"
    run_engine(_spec(str(model), store, [STORED], precompute=True), tmp_path / "old")
    # Control: unchanged weights, another process -> the stored KV is found (keys are stable).
    again = run_engine(_spec(str(model), store, [STORED]), tmp_path / "old_again")["gen"][0]["stats"]
    # Blend keeps the system prompt under prefix keys and the chunks under chunk keys.
    assert again["prefix_hit_tokens"] == 16 * (len(RAG.system) // 16)
    assert again["chunk_hit_tokens"] == 16 * sum(len(RAG.chunks[i]) // 16 for i in (0, 1, 2))

    # New random weights of the same shapes, written over the old file: same size, same
    # safetensors header, only the content (and so the mtime) differs.
    weights = model / "model.safetensors"
    new = build_tiny_model("llama", tmp_path / "new_models", seed=1) / "model.safetensors"
    assert new.stat().st_size == weights.stat().st_size
    assert safetensors_header(str(new)) == safetensors_header(str(weights))
    shutil.copyfile(new, weights)

    # One request only: a second one would (rightly) hit what the first saved on the new weights.
    reused = run_engine(_spec(str(model), store, [STORED]), tmp_path / "new")["gen"]
    plain = run_engine(_spec(str(model), None, [STORED]), tmp_path / "plain", enable_sparse=False)["gen"]
    assert reused[0]["stats"]["prefix_hit_tokens"] == 0
    assert reused[0]["stats"]["chunk_hit_tokens"] == 0
    assert_same(reused, plain)
