"""precompute_chunks with a file store: every chunk is stored when it returns.

The file store dumps in its own I/O threads, so a save returns before its blocks are
files. A request sent right after the precompute must still find every chunk block:
the scheduler's lookup waits for the keys this process is still saving. To make the
race certain rather than likely, the engine process slows every block write down
(``_slow_writes``); the engine runs in a fresh process (vLLM holds process-wide state):
``python -m tests.test_precompute_file_store MODEL STORE_DIR OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16  # ucm's default block_tokens
ROUNDS = 5
WRITE_DELAY_S = 0.1  # per block file: ~0.3 s per precompute with the store's 4 I/O threads
ORDER = [2, 0, 1]  # chunks precomputed as 0, 1, 2 and asked for in this order


def _slow_writes() -> dict[str, int]:
    """Make every block write of the file store take WRITE_DELAY_S longer; returns its call count."""
    from ucm.store import nfs_store

    real = nfs_store.write_block
    calls = {"writes": 0}
    lock = threading.Lock()

    def slow(*args: Any, **kwargs: Any) -> int:
        with lock:
            calls["writes"] += 1  # counted as it starts: the last rounds' writes may still be queued at the end
        time.sleep(WRITE_DELAY_S)
        return real(*args, **kwargs)

    nfs_store.write_block = slow
    return calls


def _engine_main(model: str, store_dir: str, out_path: str, multiprocess: str = "0") -> None:
    """ROUNDS times: precompute three fresh chunks, then at once a prompt reusing them.
    ``multiprocess`` "1": vLLM's multiprocess engine, whose worker saves in another process
    than the scheduler's lookup (so no in-process wait can help there)."""
    os.environ["ENABLE_SPARSE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiprocess
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tests.vllm.conftest import Rag, blend_config
    from ucm.integration.vllm.precompute import precompute_chunks
    from ucm.engine.stats import request_stats

    writes = _slow_writes()
    llm = LLM(model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=2048,
              max_num_batched_tokens=2048, seed=0, enable_prefix_caching=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="UCMBlendConnector", kv_connector_module_path="ucm.integration.vllm.blend_connector",
                  kv_role="kv_both", kv_connector_extra_config=blend_config(0.15, Path(store_dir))))
    rounds = []
    for r in range(ROUNDS):
        rag = Rag(seed=100 + r)  # fresh chunks each round: nothing of them is stored yet
        precompute_chunks(llm, [rag.chunks[i] for i in range(3)])
        out = llm.generate([{"prompt_token_ids": rag.prompt(ORDER, 0)}], SamplingParams(max_tokens=1, temperature=0.0),
                           use_tqdm=False)[0]
        stats = request_stats(out.request_id) or out.kv_transfer_params["ucm_stats"]
        rounds.append({"chunk_hit_tokens": stats["chunk_hit_tokens"],
                       "expected": BLOCK * sum(len(rag.chunks[i]) // BLOCK for i in ORDER)})
    Path(out_path).write_text(json.dumps({"rounds": rounds, "writes": writes["writes"], "multiprocess": multiprocess}))


@pytest.fixture(scope="module", params=["0", "1"], ids=["in_process", "multiprocess"])
def engine_result(request, tmp_path_factory) -> dict:
    from tests.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("precompute_files")
    model = build_tiny_model("llama", root)
    out = root / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # only for the in-process kernel tests (tests/conftest.py)
    proc = subprocess.run([sys.executable, "-m", "tests.test_precompute_file_store", str(model),
                           str(root / "store"), str(out), request.param], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_every_precomputed_chunk_is_found_by_the_next_request(engine_result):
    rounds = engine_result["rounds"]
    assert len(rounds) == ROUNDS
    if engine_result["multiprocess"] == "0":
        # The slowed writes really ran (the race was on): the first round's 11 chunk blocks at least.
        # (With the multiprocess engine they run, and are counted, in the worker's process.)
        assert engine_result["writes"] >= 11
    for r, got in enumerate(rounds):
        assert got["expected"] > 0
        assert got["chunk_hit_tokens"] == got["expected"], (r, rounds)


if __name__ == "__main__":
    _engine_main(*sys.argv[1:])
