"""Who the model is, for the store keys: config, dtypes, quantization and the weight files.

Why: KV is a function of the weights, not of the path they sit at. Keys that named the
model by its path alone served the old weights' KV after new weights were written there
(exact prefix hits, wrong output). :class:`ModelIdentity` gathers everything that makes
KV of the same tokens differ; its digest goes into the key seed (``HashContext``).

The weight files are fingerprinted by their *stats*, never by reading them whole (a
model is many GB; this runs at every engine start): per file its name relative to the
model dir, size and ``mtime_ns`` -- or, for a file that links into a Hugging Face cache's
content-addressed ``blobs/``, the blob's name (its content hash) instead of the mtime --
and for safetensors the JSON header (tensor names, dtypes, shapes, offsets and
``__metadata__``; a few KB read from the start of the file). Small JSON files that shape
the weights (config, shard index, quantization config) are hashed by content.

Relative names and mtimes (not inode or ctime) keep the id of a model copied with its
times (``rsync -a``, ``cp -p``, one NFS export seen from many hosts) the same, so hosts
share its KV. What it cannot see: new content written with the same size and header and
then given the old mtime back by hand.

No vllm here: the reading of vLLM's config objects lives in
``ucm.integration.vllm.model_identity``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
CONFIG_NAMES = frozenset({"config.json", "params.json"})
# safetensors itself refuses headers above 100 MB; a bigger length is not a header.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_DIGEST_BYTES = 32


def _hexdigest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces; non-JSON values (a torch dtype) as ``str``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _is_config_file(name: str) -> bool:
    """JSON files that change what the weights mean (hashed by content)."""
    if not name.endswith(".json"):
        return False
    return name in CONFIG_NAMES or name.endswith(".index.json") or "quant" in name


def safetensors_header(path: str) -> Optional[bytes]:
    """The JSON header of a safetensors file (after its u64 little-endian length), or None
    if the file is not one (too short, or a length no header can have)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_SAFETENSORS_HEADER:
                return None
            header = f.read(length)
    except OSError:
        return None
    return header if len(header) == length else None


def _blob_name(path: str) -> Optional[str]:
    """The content-hash name of the blob a Hugging Face cache snapshot file links to."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    if os.path.basename(os.path.dirname(target)) != "blobs":
        return None
    return os.path.basename(target)


def _file_record(path: str, name: str) -> dict[str, Any]:
    if _is_config_file(os.path.basename(name)):
        with open(path, "rb") as f:
            return {"name": name, "content": _hexdigest(f.read())}
    stat = os.stat(path)
    record: dict[str, Any] = {"name": name, "size": stat.st_size}
    blob = _blob_name(path)
    if blob is not None:
        record["blob"] = blob
    else:
        record["mtime_ns"] = stat.st_mtime_ns
    if name.endswith(".safetensors"):
        header = safetensors_header(path)
        record["header"] = None if header is None else _hexdigest(header)
    return record


def _identity_files(root: str) -> list[tuple[str, str]]:
    """(path, name relative to root) of the weight and config files under root, sorted.
    Hidden folders (``.cache``, ``.git``) are skipped: the loaders never read them."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.endswith(WEIGHT_SUFFIXES) or _is_config_file(filename):
                path = os.path.join(dirpath, filename)
                found.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(found, key=lambda item: item[1])


def fingerprint_files(path: str) -> str:
    """Hex digest of the weight and config files of a model dir (or of one weight file,
    e.g. a ``.gguf``). Raises FileNotFoundError if ``path`` does not exist."""
    if os.path.isfile(path):
        records = [_file_record(path, os.path.basename(path))]
    elif os.path.isdir(path):
        records = [_file_record(p, name) for p, name in _identity_files(path)]
        if not any(r["name"].endswith(WEIGHT_SUFFIXES) for r in records):
            logger.warning("ucm: no weight files under %s; the store keys name the model by its "
                           "config only", path)
    else:
        raise FileNotFoundError(path)
    return _hexdigest(canonical_json(records).encode("utf-8"))


def dummy_weights(device_type: str) -> str:
    """The weights of ``load_format='dummy'``: drawn from a fixed seed on the device, so
    the same for a given config and device type in every process, whatever the files."""
    return f"dummy:{device_type}"


def unresolved_weights(name: str, revision: Optional[str]) -> str:
    """Weights that are not on this host (a hub name not yet downloaded): name and revision
    are all there is to go by."""
    return f"unresolved:{name}@{revision or 'default'}"


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that makes the KV of the same tokens differ, as far as the model goes."""

    name: str
    config_json: str
    dtype: str
    kv_cache_dtype: str
    weights: str
    revision: Optional[str] = None
    quantization: Optional[str] = None
    load_format: str = "auto"

    def digest(self) -> str:
        """Hex digest for ``HashContext.model_identity``; stable across processes."""
        return _hexdigest(canonical_json(asdict(self)).encode("utf-8"))
