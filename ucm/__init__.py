"""ucm: a unified KV-cache module for vLLM, with Blend (CacheBlend) chunk reuse.

Dependency direction: ``config, hashing -> store -> sparse (core) -> integration``.
Only :mod:`ucm.integration.vllm` imports vLLM. ``ucm.LLM`` (the Blend plugin spec's
keyword arguments, :mod:`ucm.integration.vllm.llm_factory`) is imported on first use,
so ``import ucm`` does not import vLLM.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from ucm.integration.vllm.llm_factory import LLM

        return LLM
    raise AttributeError(f"module 'ucm' has no attribute {name!r}")
