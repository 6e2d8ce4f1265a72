"""ucm: a unified KV-cache module for vLLM, with Blend (CacheBlend) chunk reuse.

Dependency direction: ``config, hashing -> store -> sparse (core) -> integration``.
Only :mod:`ucm.integration.vllm` imports vLLM.
"""

__version__ = "0.1.0"
