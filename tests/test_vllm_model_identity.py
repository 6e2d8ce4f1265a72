"""The model identity read from vLLM's config objects (stand-ins here: plain namespaces
with the attributes vLLM's configs have), for the store keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from ucm.integration.vllm.model_identity import vllm_model_identity

MTIME = 1_700_000_000_000_000_000


class _HfConfig:
    def __init__(self, values: dict) -> None:
        self.values = values

    def to_dict(self) -> dict:
        return dict(self.values)


def _model_dir(root: Path, weights: bytes = b"w" * 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 128}))
    (root / "model.bin").write_bytes(weights)
    os.utime(root / "model.bin", ns=(MTIME, MTIME))
    return root


def _vllm_config(model: str, load_format: str = "auto", hf: dict | None = None, revision=None, quantization=None,
                 dtype: str = "torch.float32", cache_dtype: str = "auto", download_dir=None, device: str = "cpu"):
    model_config = SimpleNamespace(model=model, model_weights="", revision=revision, quantization=quantization,
                                   quantization_config=None, dtype=dtype,
                                   hf_config=_HfConfig(hf or {"hidden_size": 128, "model_type": "llama"}))
    return SimpleNamespace(model_config=model_config,
                           load_config=SimpleNamespace(load_format=load_format, download_dir=download_dir),
                           cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                           device_config=SimpleNamespace(device_type=device))


def test_local_dir_weights_change_changes_identity(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = vllm_model_identity(_vllm_config(str(model)))
    assert vllm_model_identity(_vllm_config(str(model))) == before
    (model / "model.bin").write_bytes(b"v" * 32)
    os.utime(model / "model.bin", ns=(MTIME + 1, MTIME + 1))
    assert vllm_model_identity(_vllm_config(str(model))) != before


def test_dummy_weights_are_stable_and_independent_of_the_files(tmp_path):
    model = _model_dir(tmp_path / "m")
    dummy = vllm_model_identity(_vllm_config(str(model), load_format="dummy"))
    (model / "model.bin").write_bytes(b"v" * 99)
    (model / "more.safetensors").write_bytes(b"x")
    assert vllm_model_identity(_vllm_config(str(model), load_format="dummy")) == dummy
    # The same config without files anywhere (a benchmark of a model never downloaded).
    assert vllm_model_identity(_vllm_config(str(model), load_format="DUMMY")) == dummy
    assert vllm_model_identity(_vllm_config(str(model))) != dummy
    # Dummy weights are drawn on the device from a fixed seed: another device, other values.
    assert vllm_model_identity(_vllm_config(str(model), load_format="dummy", device="cuda")) != dummy
    assert vllm_model_identity(_vllm_config(str(model), load_format="dummy", hf={"hidden_size": 64})) != dummy


def test_config_dtypes_and_quantization_change_identity(tmp_path):
    model = str(_model_dir(tmp_path / "m"))
    base = vllm_model_identity(_vllm_config(model))
    others = [_vllm_config(model, hf={"hidden_size": 128, "model_type": "llama", "rope_theta": 1.0}),
              _vllm_config(model, dtype="torch.bfloat16"), _vllm_config(model, cache_dtype="fp8"),
              _vllm_config(model, quantization="fp8"), _vllm_config(model, revision="v2")]
    ids = {vllm_model_identity(c) for c in others}
    assert base not in ids and len(ids) == len(others)


def test_hub_name_not_in_the_cache_uses_name_and_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty_cache = str(tmp_path / "cache")
    a = vllm_model_identity(_vllm_config("org/never-downloaded", download_dir=empty_cache))
    assert vllm_model_identity(_vllm_config("org/never-downloaded", download_dir=empty_cache)) == a
    assert vllm_model_identity(_vllm_config("org/never-downloaded", revision="r2", download_dir=empty_cache)) != a
    assert vllm_model_identity(_vllm_config("org/other", download_dir=empty_cache)) != a


def _hub_cache(cache: Path, commit: str, blob: str, payload: bytes) -> Path:
    """Lay out one repo the way huggingface_hub caches it: refs/main -> snapshots/<commit>,
    whose files link into content-addressed blobs/."""
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "blobs" / blob).write_bytes(payload)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps({"hidden_size": 128}))
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", blob))
    return repo / "blobs" / blob


def test_hub_name_in_the_cache_uses_the_cached_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    blob = _hub_cache(cache, "a" * 40, "1" * 64, b"\0" * 16)
    first = vllm_model_identity(_vllm_config("org/tiny", download_dir=str(cache)))
    uncached = vllm_model_identity(_vllm_config("org/tiny", download_dir=str(tmp_path / "empty")))
    assert first != uncached
    # Blobs are named by their content hash: another host's download (another mtime) is the same model.
    os.utime(blob, ns=(MTIME, MTIME))
    assert vllm_model_identity(_vllm_config("org/tiny", download_dir=str(cache))) == first
    # A new commit of the repo, pulled into the cache: new blob, new identity.
    _hub_cache(cache, "b" * 40, "2" * 64, b"\1" * 16)
    assert vllm_model_identity(_vllm_config("org/tiny", download_dir=str(cache))) != first
