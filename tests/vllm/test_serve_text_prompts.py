"""Text prompts through a real server hit the chunk cache (blend_special_str, patch 5).

A tiny Llama with a real byte-level BPE tokenizer (tests/tiny_tokenizer.py) behind
``ucm-serve serve``. The same three passages are sent as plain text in two orders
(completions), then in a third order inside a chat message: the later requests'
chunk hits, read from the response's ``kv_transfer_params["ucm_stats"]``, cover at
least 90% of their chunk tokens (whole 16-token blocks hit; a passage's last partial
block does not).
"""

from __future__ import annotations

from typing import Any

from tests.tiny_tokenizer import passages, with_tokenizer
from tests.vllm.test_serve_smoke import Server

SEP = " # # "
PASSAGES = passages(3, 200, seed=3)
QUESTION = "Question: which market sells salt?"


def kv_config() -> dict[str, Any]:
    blend = {"blend_special_str": SEP, "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 0.15}}}
    return {"kv_connector": "UCMBlendConnector", "kv_connector_module_path": "ucm.integration.vllm.blend_connector",
            "kv_role": "kv_both", "kv_connector_extra_config": {"ucm_sparse_config": {"Blend": blend}}}


def text(order: list[int]) -> str:
    return "Answer from the passages." + SEP + SEP.join(PASSAGES[i] for i in order) + SEP + QUESTION


def ucm_stats(status: int, body: dict[str, Any]) -> dict[str, Any]:
    assert status == 200, body
    return body["kv_transfer_params"]["ucm_stats"]


def test_text_prompts_hit_chunks_in_any_order_completions_and_chat(tiny_models, tmp_path):
    model = with_tokenizer(tiny_models["llama"], tmp_path / "models")
    server = Server(model, None, tmp_path / "server.log", kv_config=kv_config(), tokenizer=True)
    try:
        server.wait_healthy()
        common = {"model": str(model), "max_tokens": 2, "temperature": 0.0}
        first = ucm_stats(*server.post("/v1/completions", {**common, "prompt": text([0, 1, 2])}))
        assert first["chunk_tokens"] > 500 and first["chunk_hit_tokens"] == 0, first

        again = ucm_stats(*server.post("/v1/completions", {**common, "prompt": text([2, 0, 1])}))
        assert again["chunk_tokens"] == first["chunk_tokens"]
        assert again["chunk_hit_tokens"] >= 0.9 * again["chunk_tokens"], again

        messages = [{"role": "user", "content": text([1, 2, 0])}]
        chat = ucm_stats(*server.post("/v1/chat/completions", {**common, "messages": messages}))
        assert chat["chunk_tokens"] == first["chunk_tokens"]  # the template wraps the prefix and suffix only
        assert chat["chunk_hit_tokens"] >= 0.9 * chat["chunk_tokens"], chat
    finally:
        server.stop()
