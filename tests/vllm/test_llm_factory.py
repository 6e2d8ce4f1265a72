"""ucm.LLM(model, enable_blend=True, ...): one engine start through the spec's keywords.

In a fresh process without ENABLE_SPARSE (the factory turns it on): the returned object is
a vllm.LLM running ucm's Blend connector, and text prompts with the default separator
reuse their chunks in another order (patch 5 tokenizes them part by part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.tiny_tokenizer import passages, with_tokenizer
from tests.vllm.conftest import ROOT

SCRIPT = r"""
import json, sys
import ucm, vllm
from vllm import SamplingParams
model, texts = sys.argv[1], json.loads(sys.argv[2])
llm = ucm.LLM(model, enable_blend=True, blend_check_layers=[1], blend_recompute_ratios=[0.15],
              blend_cache_provider="cpu", dtype="float32", enforce_eager=True, max_model_len=4096, seed=0)
stats = [llm.generate([t], SamplingParams(max_tokens=2, temperature=0.0))[0].kv_transfer_params["ucm_stats"]
         for t in texts]
print("RESULT " + json.dumps({"is_vllm_llm": isinstance(llm, vllm.LLM), "stats": stats}))
"""


def test_llm_keywords_start_a_blend_engine(tiny_models, tmp_path):
    model = with_tokenizer(tiny_models["llama"], tmp_path / "models")
    sep, docs = " # # ", passages(3, 200, seed=5)
    texts = ["Read these." + sep + sep.join(docs[i] for i in order) + sep + "Question: why?"
             for order in ([0, 1, 2], [2, 1, 0])]
    env = {k: v for k, v in os.environ.items() if k not in ("ENABLE_SPARSE", "TRITON_INTERPRET")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), json.dumps(texts)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["is_vllm_llm"]
    first, second = result["stats"]
    assert first["chunk_tokens"] > 500 and first["chunk_hit_tokens"] == 0
    assert second["chunk_hit_tokens"] >= 0.9 * second["chunk_tokens"], second
