"""Settings the model or the host cannot honour fail the engine's start, naming the key.

Before, each of these started fine and silently did nothing: a check layer past the
model's depth recomputed every token while the stats said "reused"; a delimiter
token outside the vocabulary never ended a chunk; a DRAM budget below one block
cached nothing. Each refusal costs one engine start (no request runs).
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import blend_config, run_engine

BLEND = "ucm_sparse_config.Blend"
L99 = "model.layers.99.self_attn.attn"


def _dram(capacity: int) -> dict:
    config = blend_config(0.15)
    config["ucm_connectors"] = [{"ucm_connector_name": "UcmDramStore",
                                 "ucm_connector_config": {"capacity_bytes": capacity}}]
    return config


# tiny llama: 4 layers, vocabulary 512; a stored block is 4 layers x K,V x 16 tokens x 2 heads x 32 x 4 bytes.
BLOCK_BYTES = 4 * 2 * 16 * 2 * 32 * 4
CASES = [
    ("layer-past-depth",
     blend_config(compute_meta={"model.layers.1.self_attn.attn": {"ratio": 0.3}, L99: {"ratio": 0.15}}),
     [f"{BLEND}.compute_meta.{L99}:", "not an attention layer of this model", "4 layers", "[0, 4)"]),
    ("chunk-end-outside-vocab", blend_config(chunk_end_token_id=600),
     [f"{BLEND}.chunk_end_token_id:", "600", "vocabulary of 512"]),
    ("dram-below-one-block", _dram(1000),
     ["ucm_connectors[0].ucm_connector_config.capacity_bytes:", "1000", f"at least {BLOCK_BYTES}"]),
]


@pytest.mark.parametrize("ucm,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_at_engine_start(tiny_models, tmp_path, ucm, words):
    spec = {"model": str(tiny_models["llama"]), "ucm": ucm, "actions": []}
    with pytest.raises(AssertionError) as failure:
        run_engine(spec, tmp_path)
    stderr = str(failure.value)
    assert "engine process failed" in stderr
    for word in words:
        assert word in stderr, (word, stderr[-3000:])
