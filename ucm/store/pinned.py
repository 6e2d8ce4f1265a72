"""Page-locked host memory for KV blocks.

One place decides whether pinning is possible (a CUDA device is present) and how a
pinned block is allocated, so the DRAM tier and the worker's save staging draw from
the same pool: torch's caching host allocator. It keeps freed pinned blocks for reuse,
by size, and hands one out again only once the asynchronous copies that used it have
finished. Memory pinned once (``UcmDramStore.reserve``) is therefore never pinned again,
which matters because page-locking is slow (~1 ms per MiB on an H100 host) and holds
the CUDA driver's lock while it runs.
"""

from __future__ import annotations

from typing import Sequence

import torch

AVAILABLE = torch.cuda.is_available()


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised pinned CPU tensor (callers check :data:`AVAILABLE` first)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
