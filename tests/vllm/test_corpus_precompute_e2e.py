"""``python -m ucm precompute`` end to end: interrupt, resume, rerun, shards, and the chunks hit.

The tiny Llama with a real BPE tokenizer (tests/tiny_tokenizer.py), float32, eager, on a
corpus of 12 passages plus an empty document and a duplicate. One run is interrupted by a
real SIGINT once the store holds its first block file; it must stop after the batch in
flight (exit 130, no traceback) and leave a partial store. The resumed run must skip what
is stored (its counts say so) and complete the store; a third run finds it complete and
starts no engine. A RAG prompt made of stored passages, tokenized as a served text prompt,
then gets every full block of its chunks from the store. Two shard processes, 0/2 and
1/2, running at once into a fresh store, leave exactly the same block files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_tokenizer import passages, with_tokenizer
from tests.vllm.conftest import ROOT, run_engine
from ucm.integration.vllm.corpus_precompute import DocumentChunker, parse_summary
from ucm.integration.vllm.text_prompts import tokenize_segments
from ucm.sparse.blend.chunking import Delimiter

SEP = " # # "  # the default --blend-special-str
BLOCK = 16  # the default block_tokens
DOCS = passages(12, 60, seed=11)
DUPLICATE_OF = 3
RUN_TIMEOUT_S = 300
FIRST_BLOCK_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> Path:
    return with_tokenizer(tiny_models["llama"], tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = [{"id": f"doc{i}", "text": text} for i, text in enumerate(DOCS)]
    lines.insert(5, {"id": "blank", "text": ""})
    lines.append({"id": "again", "text": DOCS[DUPLICATE_OF]})
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def doc_blocks(tokenizer) -> list[int]:
    """Full blocks per passage (what the store holds of it; the tail block is never stored)."""
    chunker = DocumentChunker(tokenizer, Delimiter(separator_token_ids=sep_ids(tokenizer)), SEP)
    chunks = [chunker.chunks(text) for text in DOCS]
    assert all(len(c) == 1 and len(c[0]) >= 3 * BLOCK for c in chunks)
    return [len(c[0]) // BLOCK for c in chunks]


def sep_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(SEP, add_special_tokens=False))


def command(model: Path, corpus: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ucm", "precompute", "--model", str(model), "--corpus", str(corpus),
            "--store", str(store), "--enforce-eager", "--dtype", "float32", *extra]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("ENABLE_SPARSE", "TRITON_INTERPRET", "UCM_CONFIG_FILE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        env.pop(key, None)  # the CLI sets what it needs
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def summary(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("ucm precompute:")]
    assert lines, f"no summary line in:\n{stdout[-3000:]}"
    return parse_summary(lines[-1])


def block_files(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in store.rglob("*.ucmkv")}


def run_cli(args: list[str]) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode in (0, 130), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr, "summary": summary(proc.stdout),
            "seconds": time.monotonic() - start}


def run_interrupted(args: list[str], store: Path) -> dict[str, Any]:
    """Start a run and SIGINT it as soon as the store holds a block file."""
    proc = subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + FIRST_BLOCK_TIMEOUT_S
        while not block_files(store) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert block_files(store), "no block file appeared"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return {"rc": proc.returncode, "out": out, "err": err, "summary": summary(out)}


@pytest.fixture(scope="module")
def filled(model, corpus, tmp_path_factory) -> dict[str, Any]:
    """The store after an interrupted run, a resumed run and a rerun (the files after each)."""
    store = tmp_path_factory.mktemp("store") / "kv"
    first = run_interrupted(command(model, corpus, store, "--batch-size", "1", "--no-progress"), store)
    first["files"] = block_files(store)
    first["tmp_files"] = [p.name for p in store.rglob("*.tmp")]
    resumed = run_cli(command(model, corpus, store, "--batch-size", "4"))
    resumed["files"] = block_files(store)
    again = run_cli(command(model, corpus, store, "--no-progress"))
    again["files"] = block_files(store)
    return {"store": store, "first": first, "resumed": resumed, "again": again}


def test_interrupted_run_stops_cleanly_and_leaves_a_partial_store(filled, doc_blocks):
    first = filled["first"]
    s = first["summary"]
    assert first["rc"] == 128 + signal.SIGINT, first["err"][-3000:]
    assert "Traceback" not in first["err"] and "Traceback" not in first["out"]
    assert s["interrupted"] == "SIGINT" and s["engine_started"] == "yes" and s["failed"] == "0"
    stored = int(s["stored"])
    assert 0 < stored < len(DOCS) and int(s["submitted"]) == stored  # the batch in flight finished, no more
    # Chunks go in corpus order: the store holds exactly the first `stored` passages' blocks,
    # every one of them complete, and no half-written file.
    assert len(first["files"]) == sum(doc_blocks[:stored])
    assert first["tmp_files"] == []


def test_resumed_run_skips_the_stored_chunks_and_completes_the_store(filled, doc_blocks):
    before, resumed = filled["first"], filled["resumed"]
    s = resumed["summary"]
    assert resumed["rc"] == 0
    done_before = int(before["summary"]["stored"])
    assert int(s["skipped_stored"]) == done_before
    assert int(s["stored"]) == int(s["submitted"]) == len(DOCS) - done_before
    assert (s["documents"], s["chunks"], s["duplicates"], s["empty"], s["failed"]) == \
        (str(len(DOCS) + 2), str(len(DOCS) + 1), "1", "1", "0")
    assert len(resumed["files"]) == sum(doc_blocks)
    assert set(before["files"]) <= set(resumed["files"])
    new_bytes = sum(size for name, size in resumed["files"].items() if name not in before["files"])
    assert abs(float(s["gb_written"]) * 1e9 - new_bytes) <= 1000  # printed to 1e-6 GB
    assert float(s["chunks_per_s"]) > 0


def test_rerun_on_a_complete_store_submits_nothing(filled):
    again = filled["again"]
    s = again["summary"]
    assert again["rc"] == 0
    assert (s["submitted"], s["stored"], s["skipped_stored"], s["gb_written"]) == ("0", "0", str(len(DOCS)),
                                                                                   "0.000000")
    assert s["engine_started"] == "no"  # the store was checked before any engine started
    assert again["files"] == filled["resumed"]["files"]


def test_a_rag_prompt_of_stored_passages_hits_every_full_block(filled, model, tokenizer, doc_blocks,
                                                               tmp_path_factory):
    order = [7, 0, DUPLICATE_OF, 11]
    text = "Answer from the passages." + SEP + SEP.join(DOCS[i] for i in order) + SEP + "Question: which market?"
    ids = tokenize_segments(tokenizer, text, SEP, add_special_tokens=True)  # as vLLM's renderer does with ucm
    blend = {"separator_token_ids": list(sep_ids(tokenizer)), "pay_policy": "always",
             "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 0.15}}}
    ucm = {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                               "ucm_connector_config": {"storage_backends": str(filled["store"])}}],
           "ucm_sparse_config": {"Blend": blend}}
    spec = {"model": str(model), "ucm": ucm,
            "actions": [{"op": "generate", "name": "rag", "prompts": [{"ids": ids}], "max_tokens": 1}]}
    stats = run_engine(spec, tmp_path_factory.mktemp("rag"))["rag"][0]["stats"]
    assert stats["chunk_hit_tokens"] == BLOCK * sum(doc_blocks[i] for i in order), stats


def test_two_shards_at_once_fill_the_same_store(filled, model, corpus, tmp_path):
    store = tmp_path / "kv"
    procs = [subprocess.Popen(command(model, corpus, store, "--shard", f"{i}/2", "--no-progress"), cwd=ROOT,
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    s0, s1 = (summary(out) for out, _ in outs)
    assert (s0["shard"], s1["shard"]) == ("0/2", "1/2")
    assert int(s0["stored"]) + int(s1["stored"]) == len(DOCS)
    assert int(s0["stored"]) > 0 and int(s1["stored"]) > 0
    assert int(s0["chunks"]) + int(s1["chunks"]) == len(DOCS) + 1  # the duplicate goes where its original goes
    assert int(s0["other_shards"]) == int(s1["chunks"]) and int(s1["other_shards"]) == int(s0["chunks"])
    assert int(s0["duplicates"]) + int(s1["duplicates"]) == 1
    assert block_files(store) == filled["resumed"]["files"]  # the same block files (names are keys), same sizes


def test_a_model_vllm_cannot_load_is_refused_at_start(corpus, tmp_path):
    proc = subprocess.run(command(tmp_path / "no-such-model", corpus, tmp_path / "kv"), cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: cannot configure vLLM for --model" in proc.stderr and "no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr
