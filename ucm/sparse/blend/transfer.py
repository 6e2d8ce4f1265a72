"""Host -> device copies that never stall the host.

A copy from pageable host memory to a GPU makes the CUDA runtime synchronise the
stream first: the host waits until every kernel queued before it has run. Inside a
forward that is the whole queue -- one such copy at the check layer cost ~20 ms of
host time per 8K-token request (the first layers and the KV load had to finish), and
the host then queued the remaining layers while the GPU idled. Staging through pinned
memory makes the copy asynchronous. Plain torch: used by the Blend core and the vLLM
integration alike.
"""

from __future__ import annotations

from typing import Union

import torch


def to_device(t: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """``t`` on ``device``; from CPU to CUDA through pinned memory, asynchronously
    (the pinned staging copy is kept alive by torch's host allocator until it ran)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
