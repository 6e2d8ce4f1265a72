"""How much host memory is left to a tier that commits memory as it fills.

Why: vLLM sizes its own KV cache from the host's memory (on CPU, 20.5 of 23.5 GiB on a
24 GiB host), and the DRAM tier's arena is committed page by page as blocks are
written. A budget larger than what is left would run the host out of memory long after
start, once the tier fills; comparing it with ``MemAvailable`` when the worker registers
its KV caches (after vLLM allocated them) turns that into an error at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

MEMINFO = Path("/proc/meminfo")


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
