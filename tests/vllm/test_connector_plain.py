"""UCMConnector (plain prefix reuse) across engine processes, and start-time config errors."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=2)
PROMPTS = [RAG.prompt([0, 1, 2], 0), RAG.prompt([0, 1, 2], 1)]  # share a long prefix


def _plain_spec(model: str, store) -> dict:
    return {"model": model, "connector": "UCMConnector", "module": "ucm.integration.vllm.connector",
            "engine": {"enable_prefix_caching": False},
            "ucm": {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                                        "ucm_connector_config": {"storage_backends": str(store)}}]},
            "actions": [{"op": "generate", "name": "gen", "prompts": [{"ids": p} for p in PROMPTS],
                         "batch": False}]}


def test_prefix_blocks_are_reused_by_another_engine(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    store = tmp_path / "store"
    first = run_engine(_plain_spec(model, store), tmp_path / "first", enable_sparse=False)
    second = run_engine(_plain_spec(model, store), tmp_path / "second", enable_sparse=False)
    # Within the first engine the second prompt already hits the first one's prefix.
    assert first["gen"][0]["stats"]["prefix_hit_tokens"] == 0
    shared = 16 * ((len(RAG.prompt([0, 1, 2], 0)) - len(RAG.questions[0])) // 16)
    assert first["gen"][1]["stats"]["prefix_hit_tokens"] == shared
    # The second engine finds the whole first prompt (but its last token) on disk.
    assert second["gen"][0]["stats"]["prefix_hit_tokens"] >= len(PROMPTS[0]) - 16
    assert_same(second["gen"], first["gen"])


@pytest.mark.parametrize("connector,module,ucm,engine,needle", [
    ("UCMConnector", "ucm.integration.vllm.connector",
     {"ucm_sparse_config": {"Blend": {"chunk_end_token_id": 2}}}, {}, "use kv_connector='UCMBlendConnector'"),
    ("UCMBlendConnector", "ucm.integration.vllm.blend_connector",
     {"ucm_sparse_config": {"Blend": {"chunk_end_tokn_id": 2}}}, {}, "chunk_end_tokn_id"),
])
def test_bad_config_fails_at_engine_start(tiny_models, tmp_path, connector, module, ucm, engine, needle):
    spec = {"model": str(tiny_models["llama"]), "connector": connector, "module": module, "ucm": ucm,
            "engine": engine, "actions": []}
    with pytest.raises(AssertionError) as failure:
        run_engine(spec, tmp_path)
    assert needle in str(failure.value)


def test_store_prefix_hit_beyond_vllm_local_prefix_hit(tiny_models, tmp_path):
    """vLLM's own prefix cache holds the first 256 tokens (two 128-token CPU blocks), the
    store holds more: only the tokens between the two are loaded, at the right place."""
    x = [t for i in (0, 1, 2, 3, 4) for t in RAG.chunks[i]][:300]
    second = x[:295] + RAG.questions[2]
    spec = _plain_spec(str(tiny_models["llama"]), tmp_path / "store")
    spec["engine"] = {"enable_prefix_caching": True}
    # A salted request in between reuses the freed pages, so stale KV cannot pass for loaded KV.
    scratch = [(7 * i) % 500 + 3 for i in range(1500)]
    spec["actions"] = [{"op": "generate", "name": "gen", "batch": False,
                        "prompts": [{"ids": x + RAG.questions[1]}, {"ids": scratch, "salt": "scratch"},
                                    {"ids": second}, {"ids": second, "salt": "reference"}]}]
    out = run_engine(spec, tmp_path / "engine", enable_sparse=False)
    hit, reference = out["gen"][2], out["gen"][3]
    assert hit["stats"]["prefix_hit_tokens"] == 288
    assert reference["stats"]["prefix_hit_tokens"] == 0
    assert_same([hit], [reference])
