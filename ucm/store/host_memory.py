"""How much host memory is left to a tier that commits memory as it fills.

Why: vLLM sizes its own KV cache from the host's memory (on CPU, 20.5 of 23.5 GiB on a
24 GiB host), and the DRAM tier's arena is committed page by page as blocks are
written. A budget larger than what is left would run the host out of memory long after
start, once the tier fills; comparing it with ``MemAvailable`` when the worker registers
its KV caches (after vLLM allocated them) turns that into an error at start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ucm.config_checks import UcmConfigError

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")

HOST_HEADROOM = 0.1
"""Share of the host's available memory an explicit budget must leave free: the
engine's own host memory grows after start (request state, pinned staging, Python)."""


def available_bytes(meminfo: Path = MEMINFO) -> Optional[int]:
    """The kernel's estimate of memory available to new allocations (``MemAvailable``),
    in bytes; None where it cannot be read (not Linux)."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def fit_budget(capacity: int, is_default: bool, block_nbytes: int, available: Optional[int], key: str) -> int:
    """``capacity`` against ``available`` host bytes, before any of it is laid out: an
    explicit budget beyond it (less :data:`HOST_HEADROOM`) is refused under ``key``; the
    default one shrinks to half of what is available, in whole blocks, with a warning.
    ``available`` None (unknown) keeps the budget."""
    if available is None or capacity <= available * (1 - HOST_HEADROOM):
        return capacity
    gib = 1024**3
    if not is_default:
        raise UcmConfigError(key, (
            f"UcmDramStore's capacity_bytes is {capacity / gib:.1f} GiB but the host has "
            f"{available / gib:.1f} GiB available after vLLM allocated its KV cache; the tier would run "
            f"the host out of memory as it fills. Set capacity_bytes to at most "
            f"{int(available * (1 - HOST_HEADROOM))} bytes, or give vLLM's KV cache less host memory "
            "(on CPU: VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes)"))
    fitted = available // 2 // block_nbytes * block_nbytes
    if fitted < block_nbytes:
        raise UcmConfigError(key, (
            f"UcmDramStore cannot hold one block of {block_nbytes} bytes: the host has "
            f"{available} bytes available after vLLM allocated its KV cache"))
    logger.warning("ucm dram store: capacity_bytes is not set and its default (%.1f GiB) does not fit the "
                   "%.1f GiB the host has available; using %.1f GiB (half of it). Set capacity_bytes to "
                   "choose", capacity / gib, available / gib, fitted / gib)
    return fitted
