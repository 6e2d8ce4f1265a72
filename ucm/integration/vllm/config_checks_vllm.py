"""Checks of the ucm config against the model vLLM runs, at connector construction.

:mod:`ucm.config` validates values on their own; some settings are only wrong for a
given model (a check layer past its depth, a token id outside its vocabulary, a
separator string where vLLM loads no tokenizer). Those run and silently do nothing,
so they are refused here, at engine start, with the key's full path. This module
reads the model's facts from ``vllm_config``; the rules themselves are vLLM-free
(:meth:`ucm.config.BlendConfig.check_model`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ucm.config import UcmConfig, UcmConfigError
from ucm.config_checks import under

logger = logging.getLogger(__name__)

BLEND_KEY = "ucm_sparse_config.Blend"


def check_config_for_vllm(config: UcmConfig, vllm_config: Any) -> None:
    """Raise :class:`UcmConfigError` for a setting the model of ``vllm_config`` cannot
    honour. The Blend section is checked even with ``ENABLE_SPARSE`` off: it is the
    same config that runs once the switch is on, and start is where to learn it is wrong."""
    method = config.chunk_method  # Blend's or EPIC's section
    if method is None:
        return
    model = vllm_config.model_config
    num_layers = _num_layers(model)
    with under(f"ucm_sparse_config.{config.method_name}"):
        method.check_model(num_layers=num_layers, vocab_size=_vocab_size(model),
                                 has_tokenizer=not getattr(model, "skip_tokenizer_init", False))


def _num_layers(model: Any) -> int:
    """Decoder layers of the whole model (all pipeline stages): layer names count from 0 to this."""
    getter = getattr(model, "get_total_num_hidden_layers", None)
    count = getter() if getter is not None else getattr(model.hf_text_config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise UcmConfigError(f"{BLEND_KEY}.compute_meta", f"cannot tell how many layers the model has "
                                                          f"(got {count!r}), so the check layers cannot be checked")
    return count


def _vocab_size(model: Any) -> Optional[int]:
    """The model's vocabulary size; None (token ids unchecked, with a warning) if vLLM does not say."""
    getter = getattr(model, "get_vocab_size", None)
    size = getter() if getter is not None else getattr(model.hf_text_config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        logger.warning("ucm: the model's vocabulary size is unknown (%r); token ids in the Blend config "
                       "are not checked against it", size)
        return None
    return size
