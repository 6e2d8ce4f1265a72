"""Bad input against a real server: each gets a 4xx with a message or is served, and the
server keeps serving (CI smoke test, bounded: one tiny-model server, ~20 short requests).

Text prompts with ``blend_special_str`` (patch 5) and per-request ``ucm_blend_ratio``
through the completions API's ``vllm_xargs`` (checked at admission, patch 6).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.tiny_tokenizer import passages, with_tokenizer
from tests.vllm.test_serve_smoke import Server
from tests.vllm.test_serve_text_prompts import SEP, kv_config

MAX_LEN = 1024
DOCS = passages(2, 40, seed=7)
GOOD = "Context" + SEP + SEP.join(DOCS) + SEP + "Question: what?"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    model = with_tokenizer(tiny_models["llama"], tmp / "models")
    srv = Server(model, None, tmp / "server.log", kv_config=kv_config(), tokenizer=True,
                 extra_args=["--max-model-len", str(MAX_LEN)])
    srv.model = model
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def complete(server: Server, prompt: Any, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": str(server.model), "prompt": prompt, "max_tokens": 2, "temperature": 0.0, **extra}
    return server.post("/v1/completions", body)


def served_or_refused(status: int, body: dict[str, Any]) -> None:
    if status == 200:
        assert len(body["choices"][0]["text"]) >= 0 and body["usage"]["completion_tokens"] >= 1, body
    else:
        assert 400 <= status < 500, (status, body)
        assert body.get("error", {}).get("message"), body


@pytest.mark.parametrize("prompt", [
    SEP,  # only a separator
    SEP * 5,  # only separators
    "Context" + SEP + SEP + SEP + "Question: what?",  # empty chunks
    SEP + DOCS[0] + SEP + "Question: what?",  # a separator first
    "Context" + SEP + DOCS[0] + SEP,  # a separator last (no question)
    "Context" + SEP + "" + SEP + DOCS[1] + SEP * 2 + "Question: what?",
])
def test_odd_separator_layouts_are_served(server, prompt):
    status, body = complete(server, prompt)
    assert status == 200, body
    served_or_refused(status, body)


def test_too_long_prompt_is_refused_with_a_message(server):
    status, body = complete(server, "Context" + SEP + SEP.join(passages(20, 200, seed=9)) + SEP + "Question: ?")
    assert status == 400, body
    assert "context length" in body["error"]["message"] or "maximum" in body["error"]["message"], body


@pytest.mark.parametrize("ratio", [1.5, -0.1, "abc", "0.5", [0.5]])
def test_unusable_blend_ratio_is_a_400_naming_the_argument(server, ratio):
    status, body = complete(server, GOOD, vllm_xargs={"ucm_blend_ratio": ratio})
    assert status == 400, body
    assert "ucm_blend_ratio must be a number in [0, 1]" in body["error"]["message"], body


@pytest.mark.parametrize("ratio", [0, 0.5, 1.0, True])  # pydantic reads JSON true as 1 here
def test_usable_blend_ratio_is_served(server, ratio):
    status, body = complete(server, GOOD, vllm_xargs={"ucm_blend_ratio": ratio})
    assert status == 200, body
    assert body["kv_transfer_params"]["ucm_stats"]["chunk_tokens"] > 0


def test_server_keeps_serving_after_bad_input(server):
    """Runs last in this module: every refusal above left the server healthy."""
    assert server.get("/health") == ""
    status, body = complete(server, GOOD)
    assert status == 200 and body["kv_transfer_params"]["ucm_stats"]["chunk_hit_tokens"] > 0, body
    assert server.proc.poll() is None
