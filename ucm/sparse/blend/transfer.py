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

import ctypes
import functools
import logging
from typing import Callable, Optional, Union

import torch

logger = logging.getLogger(__name__)


def to_device(t: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """``t`` on ``device``; from CPU to CUDA through pinned memory, asynchronously
    (the pinned staging copy is kept alive by torch's host allocator until it ran)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


@functools.lru_cache(maxsize=1)
def _memcpy_2d() -> Optional[Callable[..., int]]:
    """``cudaMemcpy2DAsync`` of the CUDA runtime torch itself loaded, or None.

    torch exposes no strided host->device copy: copying a strided host view makes torch
    pack it on the host first (a CPU memcpy of the whole payload). The copy engines do
    strided (pitched) transfers natively; ucm uses them to move a range of layers of
    blocks that lie back to back in pinned memory in one call.
    """
    if not torch.cuda.is_available() or not torch.version.cuda:
        return None
    major = torch.version.cuda.split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)  # the already loaded library when the soname matches
        except OSError:
            continue
        fn = getattr(lib, "cudaMemcpy2DAsync", None)
        if fn is None:
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        return fn
    logger.info("ucm: no CUDA runtime library found for strided copies; using per-block copies")
    return None


def strided_copies_available() -> bool:
    """Whether :func:`copy_pitched` can run (a CUDA runtime with cudaMemcpy2DAsync)."""
    return _memcpy_2d() is not None


def copy_pitched(dst_ptr: int, dst_pitch: int, src_ptr: int, src_pitch: int, width: int, height: int,
                 stream: int) -> bool:
    """``height`` rows of ``width`` bytes from pinned host memory (rows ``src_pitch``
    apart) to device memory (rows ``dst_pitch`` apart), asynchronously on ``stream``
    (a ``cudaStream_t`` handle). Raw addresses, so a caller moving many runs pays no
    tensor bookkeeping per copy; the caller keeps both buffers alive until the copy ran.
    Returns False when the runtime is missing or refuses (then copy another way)."""
    fn = _memcpy_2d()
    if fn is None:
        return False
    err = fn(dst_ptr, dst_pitch, src_ptr, src_pitch, width, height, _HOST_TO_DEVICE, stream)
    if err != 0:
        logger.warning("ucm: cudaMemcpy2DAsync failed (error %d); copying another way", err)
        return False
    return True


def copy_rows_to_device(dst: torch.Tensor, src: torch.Tensor, try_pitched: bool = True) -> None:
    """``dst.copy_(src)`` for a pinned host ``src`` whose rows ``src[i]`` are contiguous
    and equally spaced (e.g. a range of layers of blocks lying back to back), into a
    contiguous CUDA ``dst``: one pitched copy on the current stream, asynchronous.
    Falls back to one copy per row (at once with ``try_pitched=False``: the caller
    already knows the pitched copy cannot run)."""
    n = src.shape[0]
    if (try_pitched and n > 0 and dst.is_cuda and dst.is_contiguous() and src.is_pinned() and src[0].is_contiguous()
            and dst.dtype == src.dtype and dst.shape == src.shape):
        row_bytes = src[0].numel() * src.element_size()
        stream = torch.cuda.current_stream(dst.device).cuda_stream
        if copy_pitched(dst.data_ptr(), row_bytes, src.data_ptr(), src.stride(0) * src.element_size(),
                        row_bytes, n, stream):
            return
    for i in range(n):
        dst[i].copy_(src[i], non_blocking=True)


def stage_runs(runs: list[tuple[int, int, torch.Tensor]], count: int, s0: int, s1: int,
               device: torch.device, pinned_runs: Optional[dict[int, bool]] = None) -> torch.Tensor:
    """Layers ``s0:s1`` of ``count`` equally shaped host blocks, given as runs lying
    back to back in host memory (``ucm.store.arena.coalesce_runs``), as one device tensor
    ``[count, s1 - s0, ...]``: one copy per run (a pitched one when only some layers
    move), no host-side concatenation, asynchronous when the blocks are pinned.
    ``pinned_runs``: whether each run is pinned, by address, shared by the groups of
    one load (asking the driver costs ~10 us per run)."""
    whole = s0 == 0 and s1 == runs[0][2].shape[1]
    if device.type != "cuda":  # the same runs, concatenated (so CPU tests cover them)
        return torch.cat([view[:, s0:s1] for _, _, view in runs]).to(device)
    shape = (count, s1 - s0) + tuple(runs[0][2].shape[2:])
    staged = torch.empty(shape, dtype=runs[0][2].dtype, device=device)
    if not whole:
        # One pitched copy per run, by address: the layer range of each block is one
        # row, blocks are one block apart in the run, back to back in `staged`.
        block = runs[0][2][0]
        layer_bytes = block[0].numel() * block.element_size()
        width = (s1 - s0) * layer_bytes
        stream = torch.cuda.current_stream(device).cuda_stream
        dst = staged.data_ptr()
        for first, n, view in runs:
            pinned = pinned_runs.get(view.data_ptr()) if pinned_runs is not None else None
            if pinned is None:
                pinned = view.is_pinned()
                if pinned_runs is not None:
                    pinned_runs[view.data_ptr()] = pinned
            if not (pinned and copy_pitched(dst + first * width, width, view.data_ptr() + s0 * layer_bytes,
                                            view.stride(0) * view.element_size(), width, n, stream)):
                copy_rows_to_device(staged[first:first + n], view[:, s0:s1], try_pitched=False)
        return staged
    targets = [staged[first:first + n] for first, n, _ in runs]
    sources = [view for _, _, view in runs]
    try:
        torch._foreach_copy_(targets, sources, non_blocking=True)
    except (RuntimeError, TypeError):  # no cross-device foreach copy in this torch
        for target, source in zip(targets, sources):
            target.copy_(source, non_blocking=True)
    return staged
