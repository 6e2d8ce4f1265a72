"""The model identity of a vLLM engine, read from its config objects, for the store keys.

Why here: ``ucm.model_identity`` fingerprints files and knows nothing of vLLM; this
module knows where vLLM keeps the config, dtypes, quantization, revision and load
format, and where a hub model's files lie on this host. Only attributes are read
(duck typing), so it runs on stand-ins in the tests and imports no vllm.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ucm.hashing import HashContext

from ucm.model_identity import (
    ModelIdentity,
    canonical_json,
    dummy_weights,
    fingerprint_files,
    unresolved_weights,
)

logger = logging.getLogger(__name__)


def _cached_snapshot(name: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    """The local snapshot folder of a hub model already in the Hugging Face cache (where
    vLLM's loaders find it), or None. Never goes to the network."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 -- not cached, not a repo name, no hub library: all a miss
        logger.debug("ucm: %s is not in the Hugging Face cache (%s)", name, exc)
        return None


def _weights(vllm_config: Any, load_format: str) -> str:
    model_config = vllm_config.model_config
    if load_format == "dummy":
        return dummy_weights(str(vllm_config.device_config.device_type))
    name = str(model_config.model)
    local = name if os.path.exists(name) else _cached_snapshot(
        name, model_config.revision, getattr(vllm_config.load_config, "download_dir", None))
    if local is None:
        logger.warning("ucm: the weights of %s are not on this host yet; the store keys name them by "
                       "model name and revision only", name)
        return unresolved_weights(name, model_config.revision)
    return fingerprint_files(local)


def vllm_model_identity(vllm_config: Any) -> str:
    """Digest of what makes this engine's KV differ from another's for the same tokens:
    HF config, revision, dtype, KV-cache dtype, quantization, load format and weights."""
    model_config = vllm_config.model_config
    load_format = str(vllm_config.load_config.load_format).lower()
    name = str(model_config.model)
    if getattr(model_config, "model_weights", ""):  # weights in object storage, configs pulled locally
        name += "|" + str(model_config.model_weights)
    quantization = model_config.quantization
    quant_config = getattr(model_config, "quantization_config", None)
    if quant_config is not None:
        quantization = canonical_json([quantization, quant_config])
    identity = ModelIdentity(
        name=name,
        config_json=canonical_json(model_config.hf_config.to_dict()),
        dtype=str(model_config.dtype),
        kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
        weights=_weights(vllm_config, load_format),
        revision=model_config.revision,
        quantization=None if quantization is None else str(quantization),
        load_format=load_format,
    )
    digest = identity.digest()
    logger.info("ucm: model identity %s (%s, weights %s)", digest[:16], name, identity.weights[:16])
    return digest


def vllm_hash_context(vllm_config: Any) -> "HashContext":
    """The store-key context of an engine: model, KV dtype, TP size and the model identity.

    One function for the connector and the corpus precompute, which plans keys before (or
    without) starting an engine: the two must agree, or a precomputed store is never hit.
    """
    from ucm.hashing import HashContext

    model = vllm_config.model_config
    return HashContext(model_id=str(model.model), kv_dtype=f"{model.dtype}/{vllm_config.cache_config.cache_dtype}",
                       tp_size=vllm_config.parallel_config.tensor_parallel_size,
                       model_identity=vllm_model_identity(vllm_config))

