"""The ucm KV engine, without vLLM: per-request reuse plans and per-step metadata
(scheduler half), loads into and saves from paged KV caches (worker half), paged-KV
layouts, row plans, in-flight saves, statistics and host timing. The vLLM adapter
(``ucm.integration.vllm``) drives it from vLLM's connector API and forward pass."""
