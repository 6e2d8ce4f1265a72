"""New weights written at the same model path must not be served the old weights' KV.

The store keys once named the model by its path only: after the weights at that path were
replaced, a prompt cached on the old weights came back as exact prefix hits and the output
was wrong. The keys now carry a fingerprint of the weight files (tests/test_model_identity.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.tiny_models import build_tiny_model
from tests.vllm.conftest import ROOT, Rag, blend_config, run_engine
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


_IDENTITIES = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from ucm.integration.vllm.model_identity import vllm_model_identity
ids = {}
for fmt in ("auto", "dummy"):
    config = EngineArgs(model=sys.argv[1], load_format=fmt, skip_tokenizer_init=True, dtype="float32",
                        max_model_len=4096, enforce_eager=True).create_engine_config()
    ids[fmt] = vllm_model_identity(config)
print("IDS" + json.dumps(ids))
"""


def _identities(model) -> dict[str, str]:
    """vllm_model_identity of vLLM's own config objects, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", _IDENTITIES, str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [row for row in proc.stdout.splitlines() if row.startswith("IDS")][-1]
    return json.loads(line[3:])


def test_dummy_weights_keep_their_keys_across_processes_and_weight_rewrites(tmp_path):
    """load_format='dummy' (benchmarks): random weights from a fixed seed, so the identity is
    the config's, stable across processes and blind to the files; real weights are not."""
    model = build_tiny_model("llama", tmp_path / "models", seed=0)
    first, second = _identities(model), _identities(model)
    assert first == second and first["auto"] != first["dummy"]
    shutil.copyfile(build_tiny_model("llama", tmp_path / "new", seed=1) / "model.safetensors",
                    model / "model.safetensors")
    after = _identities(model)
    assert after["dummy"] == first["dummy"] and after["auto"] != first["auto"]
