"""``ucm.LLM(model, enable_blend=True, ...)``: the Blend plugin spec's keyword arguments.

A thin factory, not a subclass or fork of ``vllm.LLM``: it turns the Blend keywords
into the ``kv_transfer_config`` dict (:func:`cli_flags.blend_kv_transfer_config`, the
same translation and checks as ``ucm-serve --enable-blend``), turns ``ENABLE_SPARSE``
on, and returns the ``vllm.LLM`` vLLM builds from it. Every other keyword goes to
``vllm.LLM`` untouched.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ucm.config import ENABLE_SPARSE_ENV, UcmConfigError
from ucm.integration.vllm.cli_flags import (
    DEFAULT_CHECK_LAYERS,
    DEFAULT_PROVIDER,
    DEFAULT_RATIOS,
    blend_kv_transfer_config,
)


def LLM(model: str, *, enable_blend: bool = False, blend_check_layers: Any = DEFAULT_CHECK_LAYERS,
        blend_recompute_ratios: Any = DEFAULT_RATIOS, blend_cache_provider: Any = DEFAULT_PROVIDER,
        blend_special_str: Optional[str] = None, blend_chunk_end_token_id: Optional[int] = None,
        **kwargs: Any) -> Any:
    """A ``vllm.LLM``; with ``enable_blend`` it runs ucm's Blend connector.

    Raises :class:`ucm.config.UcmConfigError` (before any engine starts) for settings the
    dict config would refuse, with the same message and key path, and for
    ``kv_transfer_config`` given together with ``enable_blend``.
    """
    from vllm import LLM as VllmLLM

    blend_keys = {"blend_check_layers": blend_check_layers is not DEFAULT_CHECK_LAYERS,
                  "blend_recompute_ratios": blend_recompute_ratios is not DEFAULT_RATIOS,
                  "blend_cache_provider": blend_cache_provider is not DEFAULT_PROVIDER,
                  "blend_special_str": blend_special_str is not None,
                  "blend_chunk_end_token_id": blend_chunk_end_token_id is not None}
    if not enable_blend:
        given = [k for k, set_ in blend_keys.items() if set_]
        if given:
            raise UcmConfigError(given[0], "needs enable_blend=True")
        return VllmLLM(model, **kwargs)
    if kwargs.get("kv_transfer_config") is not None:
        raise UcmConfigError("kv_transfer_config", "enable_blend builds it; give one or the other")
    config = blend_kv_transfer_config(blend_check_layers, blend_recompute_ratios, blend_cache_provider,
                                      blend_special_str, blend_chunk_end_token_id)
    os.environ[ENABLE_SPARSE_ENV] = "1"  # inherited by every engine process vLLM starts
    from ucm.integration.vllm import plugin

    plugin.register()  # vLLM may have loaded its plugins in this process before ENABLE_SPARSE was on
    return VllmLLM(model, kv_transfer_config=config, **kwargs)
