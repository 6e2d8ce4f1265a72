"""What ucm can check before the first request, checked at engine start.

A setting ucm cannot honour must stop ``LLM(...)`` with a message that names it, not
pass start-up and then take the engine down at the first request. Two moments:

* connector construction (:func:`check_at_start`, both roles): the ucm environment
  switches (``UCM_LOAD_KERNEL``, ``UCM_ROPE_KERNEL``, ``UCM_BLEND_ATTENTION``: a bad
  value, or ``triton`` where Triton cannot run) and, with Blend, the model's
  architecture as its HF config names it;
* once the worker's KV caches are registered (:func:`check_decoder_layers`, called by
  patch 0 in :mod:`patches` on the loaded model): the real decoder layer classes,
  which the architecture name only predicts.
"""

from __future__ import annotations

from typing import Any

import torch

from ucm.config_checks import UcmConfigError

# HF architecture -> the vLLM decoder layer its model is built from (vLLM 0.26/0.32).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "Qwen3ForCausalLM": "Qwen3DecoderLayer",
}
SUPPORTED_DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_VLLM_MODELS = "vllm.model_executor.models."  # where the patched layer classes live


def supported_models() -> str:
    """The sentence every refusal of a model ends with."""
    return (f"Blend supports {', '.join(SUPPORTED_ARCHITECTURES)} (vLLM's own "
            f"{', '.join(SUPPORTED_DECODER_LAYERS)}); use kv_connector='UCMConnector' (prefix reuse, any "
            "model) or unset ENABLE_SPARSE")


def check_at_start(vllm_config: Any, blend_on: bool) -> None:
    """Everything a connector can check at construction; raises :class:`UcmConfigError`."""
    check_env_switches(str(getattr(vllm_config.device_config, "device_type", "cpu")))
    if blend_on:
        check_architecture(vllm_config.model_config)


def check_env_switches(device_type: str) -> None:
    """Each ucm implementation switch holds an allowed value, and a forced Triton kernel
    can run on ``device_type``."""
    from ucm.engine import kv_load
    from ucm.sparse.blend import attention, rope

    for choice in (kv_load.KERNEL, rope.KERNEL, attention.KERNEL):
        choice.check(device_type)


def check_architecture(model_config: Any) -> None:
    """Blend patches the decoder layers of a few vLLM models: refuse any other."""
    hf_config = getattr(model_config, "hf_config", None)
    names = list(getattr(hf_config, "architectures", None) or getattr(model_config, "architectures", None) or [])
    if not any(name in SUPPORTED_ARCHITECTURES for name in names):
        raise UcmConfigError("model", f"unsupported model {model_config.model!r} (architecture "
                             f"{', '.join(names) or 'unknown'}): {supported_models()}")
    impl = getattr(model_config, "model_impl", "auto")
    if getattr(impl, "value", impl) == "transformers":
        raise UcmConfigError("model_impl", "unsupported model implementation 'transformers' (HF's decoder "
                             f"layers, which Blend does not patch): {supported_models()}; use model_impl='auto'")


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, int]:
    """The model's decoder layers (``model.layers``) and the end of this rank's share."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UcmConfigError("model", f"unsupported model {type(model).__name__}: it has no model.layers; "
                             f"{supported_models()}")
    return layers, getattr(inner, "end_layer", len(layers))


def check_decoder_layers(model: torch.nn.Module) -> None:
    """Every decoder layer is one Blend's layer hooks know (by class and origin)."""
    layers, _ = decoder_layers(model)
    for layer in layers:
        cls = type(layer)
        if cls.__name__ == "PPMissingLayer":
            continue
        if cls.__name__ not in SUPPORTED_DECODER_LAYERS or not cls.__module__.startswith(_VLLM_MODELS):
            raise UcmConfigError("model", f"unsupported model {type(model).__name__}: decoder layer "
                                 f"{cls.__module__}.{cls.__name__} is not supported; {supported_models()}")
        if getattr(layer, "post_attention_layernorm", None) is None:
            raise UcmConfigError("model", f"unsupported model {type(model).__name__}: decoder layer "
                                 f"{cls.__name__} has no post_attention_layernorm; {supported_models()}")
