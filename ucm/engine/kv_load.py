"""Move KV blocks between a staged ``[blocks, layers, 2, T, H, D]`` tensor and the paged
caches of several layers: loads write staged rows into the caches, saves read them out.

A load stages its stored blocks on the device (:func:`ucm.sparse.blend.transfer.stage_runs`); every loaded
token row then goes to its slot in each layer's paged cache, K re-rotated from the
position it was saved at to its position in this prompt. A save is the inverse: every
saved token row is read from its slot in each layer, K rotated back to the position its
key stands for. Two implementations of each:

* ``triton`` -- :mod:`ucm.sparse.blend.load_triton` (``scatter_blocks`` /
  ``gather_blocks``): every layer in one launch, each element read and written once;
* ``torch`` -- per layer gathers or scatters and rotations; any layout (the probed
  CPU_ATTN one too).

``UCM_LOAD_KERNEL=auto`` (default) takes the kernel for CUDA caches it supports;
``torch`` never; ``triton`` insists (CPU tensors need ``TRITON_INTERPRET=1``).
No vLLM import: the views are :mod:`kv_layout`'s.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from ucm.engine.kv_layout import PagedKV
from ucm.kernel_choice import KernelChoice
from ucm.sparse.blend.rope import RopeSpec, _delta_cos_sin, apply_rotation

logger = logging.getLogger(__name__)

KERNEL_ENV = "UCM_LOAD_KERNEL"
# Torch path: K of as many layers at once as fit in this many bytes is rotated in one
# launch; 64 MiB = 4 layers of an 8K-token Llama-3-8B load, 8 at 4K tokens.
ROPE_SLICE_BYTES = 64 << 20  # the default of EngineOptions.rope_slice_bytes

ROWS = ("source", "slot", "position", "delta")  # the rows of the ``[4, R]`` index tensor
KERNEL = KernelChoice(KERNEL_ENV, ("auto", "torch", "triton"), module_name="ucm.sparse.blend.load_triton",
                      label="Triton load/save kernel", fallback="torch ops")
"""``UCM_LOAD_KERNEL``; under auto a kernel failure gives the kernel up for the process."""


def _kernel_for(staged: torch.Tensor, views: Sequence[PagedKV]) -> Any:
    """The kernel module when it should run, None for the torch path; raises when forced but impossible."""
    mode = KERNEL.mode()
    if mode == "torch" or (mode == "auto" and not staged.is_cuda):
        return None
    mod = KERNEL.module()
    plain = all(view.strided for view in views)
    ok = mod is not None and plain and mod.supports(staged, [v.k for v in views], [v.v for v in views])
    if mode == "triton" and not ok:
        raise RuntimeError(f"{KERNEL_ENV}=triton but the load kernel cannot take these caches (needs Triton, "
                           "CUDA or TRITON_INTERPRET=1, and equally strided per-layer views); use auto/torch")
    return mod if ok else None


def write_layers(staged: torch.Tensor, first: int, views: Sequence[PagedKV], rows: torch.Tensor,
                 rope: Optional[RopeSpec], rotate: bool, full_rows: bool,
                 located: Optional[dict[tuple, tuple[torch.Tensor, ...]]] = None,
                 rope_slice_bytes: int = ROPE_SLICE_BYTES) -> None:
    """Write staged layers ``first..first+len(views)-1`` into ``views``.

    ``rows``: int64 ``[4, R]`` on the device (:data:`ROWS`); ``full_rows``: the rows are
    every staged row in order (no gather needed). ``located``: slot addresses per
    layout, shared between calls of one load (torch path). ``rope_slice_bytes``: device
    bytes of re-rotated K per slice on the torch path. Ordered on the current stream.
    """
    ks, vs = [v.k for v in views], [v.v for v in views]
    if not _ran_kernel("scatter_blocks", staged, views, (staged, first, ks, vs, rows, rope, rotate)):
        _write_torch(staged, first, views, rows, rope, rotate, full_rows, {} if located is None else located,
                     rope_slice_bytes)


def read_layers(blocks: torch.Tensor, views: Sequence[PagedKV], rows: torch.Tensor,
                rope: Optional[RopeSpec], rotate: bool) -> None:
    """Fill ``blocks`` (``[n, len(views), 2, T, H, D]``) from ``views``, a save.

    ``rows``: int64 ``[4, n * T]`` on the device (:data:`ROWS`): every block row in order,
    its cache slot, the token's prompt position, and its RoPE delta (the stored key
    stands at ``position - delta``). Ordered on the current stream, after pending loads.
    """
    if blocks.shape[1] != len(views):
        raise ValueError(f"ucm: {blocks.shape[1]} layers of blocks to fill from {len(views)} layers")
    for view in views:
        view.wait_ready()
    ks, vs = [v.k for v in views], [v.v for v in views]
    if not _ran_kernel("gather_blocks", blocks, views, (blocks, ks, vs, rows, rope, rotate)):
        _read_torch(blocks, views, rows, rope, rotate)


def _ran_kernel(name: str, staged: torch.Tensor, views: Sequence[PagedKV], args: tuple) -> bool:
    """Run the kernel module's ``name(*args)`` when it should; False: use the torch path.
    In auto mode a kernel failure is logged once and the torch path is used from then on."""
    kernel = None if KERNEL.broken else _kernel_for(staged, views)
    if kernel is None:
        return False
    try:
        getattr(kernel, name)(*args)
        return True
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton that cannot compile for this GPU
        if KERNEL.forced():
            raise
        KERNEL.give_up(exc)
        return False


def _read_torch(blocks: torch.Tensor, views: Sequence[PagedKV], rows: torch.Tensor,
                rope: Optional[RopeSpec], rotate: bool) -> None:
    _, slot, position, delta = rows
    n, b = blocks.shape[0], blocks.shape[3]
    cos = sin = None
    if rotate:
        # The same rotation for every layer: its tables once, not once per layer (on the
        # CPU they cost as much as the rotation itself; a cold prompt's save paid it L times).
        assert rope is not None
        cos, sin = _delta_cos_sin(-delta, rope, position, blocks.device)
    located: dict[tuple, tuple[torch.Tensor, ...]] = {}  # every layer reads the same slots
    for i, view in enumerate(views):
        where = located.get(view.layout_key)
        if where is None:
            where = located[view.layout_key] = view.locate(slot)
        k, v = view.gather_at(where)
        if cos is not None:
            k = apply_rotation(k, cos, sin, rope)
        blocks[:, i, 0] = k.view(n, b, *k.shape[1:])
        blocks[:, i, 1] = v.view(n, b, *v.shape[1:])


def _write_torch(staged: torch.Tensor, first: int, views: Sequence[PagedKV], rows: torch.Tensor,
                 rope: Optional[RopeSpec], rotate: bool, full_rows: bool,
                 located: dict[tuple, tuple[torch.Tensor, ...]], rope_slice_bytes: int) -> None:
    source, slot, position, delta = rows
    cos = sin = None
    if rotate:
        assert rope is not None
        cos, sin = _delta_cos_sin(delta, rope, position - delta, staged.device)
    heads, dim = staged.shape[-2], staged.shape[-1]
    # K of several layers as [layers, rows, H, D], rotated in one launch (per-layer
    # launches cost ~50 us of host time each on CUDA); slices of at most
    # rope_slice_bytes keep the extra device memory small.
    layer_bytes = staged[:, 0, 0].numel() * staged.element_size()
    per_slice = max(1, rope_slice_bytes // max(1, layer_bytes))
    k_slice: Optional[torch.Tensor] = None
    for q, view in enumerate(views):
        if q % per_slice == 0:
            q1 = min(len(views), q + per_slice)
            k_slice = staged[:, first + q:first + q1, 0].transpose(0, 1).reshape(q1 - q, -1, heads, dim)
            if not full_rows:
                k_slice = k_slice[:, source]
            if rotate:
                k_slice = apply_rotation(k_slice, cos, sin, rope)
        assert k_slice is not None
        k = k_slice[q % per_slice]
        v = staged[:, first + q, 1].reshape(-1, heads, dim)
        if not full_rows:
            v = v[source]
        where = located.get(view.layout_key)
        if where is None:
            where = located[view.layout_key] = view.locate(slot)
        view.scatter_at(where, k, v)

