"""Model identity in the store keys: a fingerprint of the weight files that changes when
the weights at a path change, and stays put when nothing changed (across processes too)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ucm.hashing import HashContext, block_keys
from ucm.model_identity import ModelIdentity, canonical_json, fingerprint_files, safetensors_header

ROOT = Path(__file__).resolve().parents[1]
MTIME = 1_700_000_000_123_456_789


def _write_safetensors(path: Path, data: bytes, metadata: dict | None = None) -> None:
    """A minimal safetensors file: u64 header length, JSON header, raw tensor bytes."""
    header = {"w": {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    os.utime(path, ns=(MTIME, MTIME))


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    _write_safetensors(root / "model-00001-of-00002.safetensors", bytes(range(64)), {"format": "pt"})
    (root / "model-00002-of-00002.bin").write_bytes(b"b" * 48)
    os.utime(root / "model-00002-of-00002.bin", ns=(MTIME, MTIME))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    (root / "tokenizer.json").write_text("{}")
    return root


def test_same_files_same_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    assert fingerprint_files(str(model)) == fingerprint_files(str(model))


def test_a_copy_keeping_names_sizes_and_mtimes_has_the_same_id(tmp_path):
    """The id names files relative to the model dir: the same model at another path (another
    host's mount, an ``rsync -a`` copy) keeps its keys."""
    model = _model_dir(tmp_path / "m")
    copy = tmp_path / "elsewhere" / "m"
    shutil.copytree(model, copy, copy_function=shutil.copy2)
    assert fingerprint_files(str(copy)) == fingerprint_files(str(model))


def test_rewritten_safetensors_same_size_and_header_new_mtime_changes_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    weights = model / "model-00001-of-00002.safetensors"
    header = safetensors_header(str(weights))
    _write_safetensors(weights, bytes(reversed(range(64))), {"format": "pt"})
    os.utime(weights, ns=(MTIME + 1_000, MTIME + 1_000))
    assert safetensors_header(str(weights)) == header and weights.stat().st_size == 8 + len(header) + 64
    assert fingerprint_files(str(model)) != before


def test_rewritten_bin_new_mtime_changes_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    weights = model / "model-00002-of-00002.bin"
    weights.write_bytes(b"c" * 48)
    os.utime(weights, ns=(MTIME + 5, MTIME + 5))
    assert fingerprint_files(str(model)) != before


def test_size_change_with_the_old_mtime_changes_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    weights = model / "model-00002-of-00002.bin"
    weights.write_bytes(b"b" * 56)
    os.utime(weights, ns=(MTIME, MTIME))
    assert fingerprint_files(str(model)) != before


def test_safetensors_header_change_with_same_size_and_mtime_changes_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    weights = model / "model-00001-of-00002.safetensors"
    size = weights.stat().st_size
    _write_safetensors(weights, bytes(range(64)), {"format": "pu"})  # same length, other metadata
    assert weights.stat().st_size == size and weights.stat().st_mtime_ns == MTIME
    assert fingerprint_files(str(model)) != before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_config_or_index_change_changes_id(tmp_path, name):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    path = model / name
    text = json.loads(path.read_text())
    text["changed"] = 1
    path.write_text(json.dumps(text))
    assert fingerprint_files(str(model)) != before


def test_added_or_removed_weight_file_changes_id(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    extra = model / "extra.pt"
    extra.write_bytes(b"x")
    with_extra = fingerprint_files(str(model))
    extra.unlink()
    (model / "model-00002-of-00002.bin").unlink()
    assert len({before, with_extra, fingerprint_files(str(model))}) == 3


def test_files_that_do_not_hold_weights_do_not_matter(tmp_path):
    model = _model_dir(tmp_path / "m")
    before = fingerprint_files(str(model))
    (model / "tokenizer.json").write_text('{"changed": true}')
    (model / "README.md").write_text("notes")
    hidden = model / ".cache"
    hidden.mkdir()
    (hidden / "old.safetensors").write_bytes(b"junk")
    assert fingerprint_files(str(model)) == before


def test_a_single_weight_file_is_fingerprinted(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    os.utime(path, ns=(MTIME, MTIME))
    before = fingerprint_files(str(path))
    os.utime(path, ns=(MTIME + 1, MTIME + 1))
    assert fingerprint_files(str(path)) != before


def test_a_torn_safetensors_header_is_still_fingerprinted(tmp_path):
    """A file that is not a safetensors file (or a huge header length) is recorded by its
    stats, never read whole and never an error (ucm is a cache: it must not stop the engine)."""
    model = _model_dir(tmp_path / "m")
    weights = model / "model-00001-of-00002.safetensors"
    weights.write_bytes(struct.pack("<Q", 1 << 60) + b"{")
    assert safetensors_header(str(weights)) is None
    assert fingerprint_files(str(model)) == fingerprint_files(str(model))


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        fingerprint_files(str(tmp_path / "nope"))


def test_stable_across_processes(tmp_path):
    model = _model_dir(tmp_path / "m")
    code = f"from ucm.model_identity import fingerprint_files; print(fingerprint_files({str(model)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "999", "PATH": "", "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == fingerprint_files(str(model))


def _identity(**overrides) -> ModelIdentity:
    fields = dict(name="/models/m", config_json=canonical_json({"hidden_size": 128}), dtype="torch.float32",
                  kv_cache_dtype="auto", weights="w1", revision=None, quantization=None, load_format="auto")
    fields.update(overrides)
    return ModelIdentity(**fields)


def test_every_identity_field_changes_the_digest():
    base = _identity().digest()
    assert _identity().digest() == base
    changed = [_identity(name="/models/n"), _identity(config_json=canonical_json({"hidden_size": 64})),
               _identity(dtype="torch.bfloat16"), _identity(kv_cache_dtype="fp8"), _identity(weights="w2"),
               _identity(revision="abc"), _identity(quantization="fp8"), _identity(load_format="dummy")]
    digests = {c.digest() for c in changed}
    assert base not in digests and len(digests) == len(changed)


def test_canonical_json_ignores_key_order_and_tolerates_non_json_values():
    import torch

    assert canonical_json({"a": 1, "b": {"y": 2, "x": 3}}) == canonical_json({"b": {"x": 3, "y": 2}, "a": 1})
    assert "float16" in canonical_json({"torch_dtype": torch.float16})


def test_model_identity_isolates_store_keys():
    tokens = list(range(32))
    old = HashContext("/models/m", "torch.float32", model_identity=_identity(weights="w1").digest())
    new = HashContext("/models/m", "torch.float32", model_identity=_identity(weights="w2").digest())
    same = HashContext("/models/m", "torch.float32", model_identity=_identity(weights="w1").digest())
    assert set(block_keys(old.seed(), tokens, 16)).isdisjoint(block_keys(new.seed(), tokens, 16))
    assert block_keys(old.seed(), tokens, 16) == block_keys(same.seed(), tokens, 16)
