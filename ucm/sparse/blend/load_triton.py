"""Triton kernel: move KV blocks between a staged tensor and every layer's paged cache in
one launch -- loads (staged -> cache, :func:`scatter_blocks`) and saves (cache -> staged,
:func:`gather_blocks`).

A chunk load stages its stored blocks on the GPU as ``[blocks, layers, 2, T, H, D]``;
each loaded token row then has to land in the paged cache of every layer at its slot,
with K re-rotated by the token's RoPE shift. In torch that is, per layer, a K slice,
a rotation, and two index_put_ scatters (plus the cos/sin tables): ~150 launches and
~10 ms of host time for an 8K-token load on an H100, all before the forward can start,
and K is read and written twice. This kernel reads each staged element once and writes
it once, rotation included, for all layers; one launch per load.

Layout: the staged tensor is contiguous; the caches are ``[num_blocks, block_size,
heads, head_dim]`` *views* (:class:`ucm.engine.kv_layout.PagedKV`) with any
strides, as long as every layer's view has the same shape, strides and dtype (vLLM
allocates one equal tensor per layer). The layers are addressed from the first layer's
base by element offsets (``data_ptr`` differences), so no pointer table is needed.

Angles: the same float32-then-float64 difference as ``rope._delta_cos_sin`` with
``from_positions`` (mode 2 of :mod:`rope_triton`), formed once per tile row.

Interpreter: decorated lazily per mode like :mod:`rope_triton` (with its helpers), so CPU
tests run it under ``TRITON_INTERPRET=1`` set before Triton is imported.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from .rope import RopeSpec, _inv_freq_on
from .rope_triton import SUPPORTED_DTYPES, _next_pow2, interpreting, moved_angles, pair_dims
from .transfer import to_device


def _scatter_kernel(
    staged_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr,
    src_ptr, slot_ptr, pos_ptr, delta_ptr, inv_ptr,
    n_rows, first_layer, n_staged_layers, block_tokens, block_size, n_heads,
    k_sb, k_st, k_sh, v_sb, v_st, v_sh,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, TAIL: tl.constexpr,
    TAIL_P: tl.constexpr, DIM_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    NEOX: tl.constexpr, ROTATE: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < n_rows
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    head_ok = heads < n_heads

    # Where each row comes from (staged) and goes to (cache block, offset).
    src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    b = src // block_tokens
    t = src % block_tokens
    token_elems = n_heads * HEAD_DIM
    plane = block_tokens * token_elems  # one (layer, K or V) plane of a staged block
    stage_l = first_layer + layer
    k_src = staged_ptr + ((b * n_staged_layers + stage_l) * 2) * plane + t * token_elems
    v_src = k_src + plane
    k_dst = k_ptr + tl.load(k_off_ptr + layer) + blk * k_sb + off * k_st
    v_dst = v_ptr + tl.load(v_off_ptr + layer) + blk * v_sb + off * v_st

    ok = row_ok[:, None, None] & head_ok[None, :, None]  # [BLOCK_N, BLOCK_H, 1]
    src_k = k_src[:, None, None] + heads[None, :, None] * HEAD_DIM
    dst_k = k_dst[:, None, None] + heads[None, :, None] * k_sh

    # ---- K: rotate the pairs, copy the pass-through dims --------------------------------
    pairs = tl.arange(0, HALF_P)
    pair_ok = pairs < HALF
    m = ok & pair_ok[None, None, :]
    i1, i2 = pair_dims(pairs, HALF, NEOX)
    x1 = tl.load(src_k + i1, mask=m, other=0.0)
    x2 = tl.load(src_k + i2, mask=m, other=0.0)
    if ROTATE:
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        inv = tl.load(inv_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
        cos, sin = moved_angles(pos, pos - delta, inv)
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        y1 = f1 * cos - f2 * sin
        y2 = f2 * cos + f1 * sin
        tl.store(dst_k + i1, y1.to(k_ptr.dtype.element_ty), mask=m)
        tl.store(dst_k + i2, y2.to(k_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dst_k + i1, x1.to(k_ptr.dtype.element_ty), mask=m)
        tl.store(dst_k + i2, x2.to(k_ptr.dtype.element_ty), mask=m)
    if TAIL > 0:
        tail = 2 * HALF + tl.arange(0, TAIL_P)[None, None, :]
        mt = ok & (tail < HEAD_DIM)
        xt = tl.load(src_k + tail, mask=mt, other=0.0)
        tl.store(dst_k + tail, xt.to(k_ptr.dtype.element_ty), mask=mt)

    # ---- V: a plain copy -------------------------------------------------------------
    d = tl.arange(0, DIM_P)[None, None, :]
    mv = ok & (d < HEAD_DIM)
    v = tl.load(v_src[:, None, None] + heads[None, :, None] * HEAD_DIM + d, mask=mv, other=0.0)
    tl.store(v_dst[:, None, None] + heads[None, :, None] * v_sh + d, v.to(v_ptr.dtype.element_ty), mask=mv)


def _gather_kernel(
    out_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr,
    dst_ptr, slot_ptr, pos_ptr, delta_ptr, inv_ptr,
    n_rows, n_layers, block_tokens, block_size, n_heads,
    k_sb, k_st, k_sh, v_sb, v_st, v_sh,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, TAIL: tl.constexpr,
    TAIL_P: tl.constexpr, DIM_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    NEOX: tl.constexpr, ROTATE: tl.constexpr,
):
    """The inverse of ``_scatter_kernel`` (a separate kernel: folding both directions into
    one behind a constexpr flag made the load direction 8x slower on an H100)."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < n_rows
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    head_ok = heads < n_heads

    # Where each row comes from (cache block, offset) and goes to (output block row).
    dst = tl.load(dst_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    b = dst // block_tokens
    t = dst % block_tokens
    token_elems = n_heads * HEAD_DIM
    plane = block_tokens * token_elems
    k_out = out_ptr + ((b * n_layers + layer) * 2) * plane + t * token_elems
    v_out = k_out + plane
    k_src = k_ptr + tl.load(k_off_ptr + layer) + blk * k_sb + off * k_st
    v_src = v_ptr + tl.load(v_off_ptr + layer) + blk * v_sb + off * v_st

    ok = row_ok[:, None, None] & head_ok[None, :, None]
    src_k = k_src[:, None, None] + heads[None, :, None] * k_sh
    dst_k = k_out[:, None, None] + heads[None, :, None] * HEAD_DIM

    pairs = tl.arange(0, HALF_P)
    pair_ok = pairs < HALF
    m = ok & pair_ok[None, None, :]
    i1, i2 = pair_dims(pairs, HALF, NEOX)
    x1 = tl.load(src_k + i1, mask=m, other=0.0)
    x2 = tl.load(src_k + i2, mask=m, other=0.0)
    if ROTATE:  # from the token's position to where its stored key stands
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        inv = tl.load(inv_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
        cos, sin = moved_angles(pos - delta, pos, inv)
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        tl.store(dst_k + i1, (f1 * cos - f2 * sin).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(dst_k + i2, (f2 * cos + f1 * sin).to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dst_k + i1, x1.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(dst_k + i2, x2.to(out_ptr.dtype.element_ty), mask=m)
    if TAIL > 0:
        tail = 2 * HALF + tl.arange(0, TAIL_P)[None, None, :]
        mt = ok & (tail < HEAD_DIM)
        xt = tl.load(src_k + tail, mask=mt, other=0.0)
        tl.store(dst_k + tail, xt.to(out_ptr.dtype.element_ty), mask=mt)

    d = tl.arange(0, DIM_P)[None, None, :]
    mv = ok & (d < HEAD_DIM)
    v = tl.load(v_src[:, None, None] + heads[None, :, None] * v_sh + d, mask=mv, other=0.0)
    tl.store(v_out[:, None, None] + heads[None, :, None] * HEAD_DIM + d, v.to(out_ptr.dtype.element_ty), mask=mv)


@functools.lru_cache(maxsize=4)
def _jit(interpret: bool, gather: bool) -> Any:
    del interpret  # cache key only: triton.jit reads TRITON_INTERPRET when it decorates
    if gather:
        return triton.jit(_gather_kernel, do_not_specialize=["n_rows"])
    return triton.jit(_scatter_kernel, do_not_specialize=["n_rows", "first_layer"])


def _same_geometry(views: Sequence[torch.Tensor]) -> bool:
    first = views[0]
    return all(v.shape == first.shape and v.stride() == first.stride() and v.dtype == first.dtype
               and v.device == first.device for v in views)


def _element_offsets(views: Sequence[torch.Tensor]) -> Optional[list[int]]:
    base, size = views[0].data_ptr(), views[0].element_size()
    out = []
    for v in views:
        gap = v.data_ptr() - base
        if gap % size:
            return None
        out.append(gap // size)
    return out


@functools.lru_cache(maxsize=64)
def _offsets_on(k_offsets: tuple[int, ...], v_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[2, layers]`` element offsets on the device, copied once per set of caches."""
    return to_device(torch.tensor([k_offsets, v_offsets], dtype=torch.int64), device)


def supports(staged: torch.Tensor, k_views: Sequence[torch.Tensor], v_views: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`scatter_blocks` can take these tensors (else use the torch path)."""
    if not k_views or len(k_views) != len(v_views) or staged.dim() != 6 or not staged.is_contiguous():
        return False
    if not (staged.is_cuda or interpreting()) or staged.dtype not in SUPPORTED_DTYPES:
        return False
    for views in (k_views, v_views):
        if (not _same_geometry(views) or views[0].dim() != 4 or views[0].stride(-1) != 1
                or views[0].device != staged.device or views[0].dtype not in SUPPORTED_DTYPES
                or _element_offsets(views) is None):
            return False
    heads, dim = staged.shape[-2], staged.shape[-1]
    return tuple(k_views[0].shape[2:]) == (heads, dim) and tuple(v_views[0].shape[2:]) == (heads, dim)


def scatter_blocks(staged: torch.Tensor, first_layer: int, k_views: Sequence[torch.Tensor],
                   v_views: Sequence[torch.Tensor], rows: torch.Tensor, spec: Optional[RopeSpec],
                   rotate: bool, block_rows: int = 16, num_warps: int = 4) -> None:
    """Write staged rows into every layer's paged K/V, K shifted by its RoPE delta.

    ``staged``: ``[blocks, staged_layers, 2, T, H, D]``; layer ``first_layer + i`` goes to
    ``k_views[i]``/``v_views[i]`` (``[num_blocks, block_size, H, D]``). ``rows``: int64
    ``[4, R]`` on the device: staged row (``block * T + token``), cache slot, prompt
    position, RoPE delta (the key was rotated at ``position - delta``). ``rotate=False``
    copies K unchanged. Check :func:`supports` first.
    """
    _launch(staged, first_layer, k_views, v_views, rows, spec, rotate, False, block_rows, num_warps)


def gather_blocks(blocks: torch.Tensor, k_views: Sequence[torch.Tensor], v_views: Sequence[torch.Tensor],
                  rows: torch.Tensor, spec: Optional[RopeSpec], rotate: bool, block_rows: int = 16,
                  num_warps: int = 4) -> None:
    """The inverse of :func:`scatter_blocks`, for saves: fill ``blocks`` (``[blocks,
    layers, 2, T, H, D]``, every layer) from the paged caches, K rotated from the
    token's prompt position to ``position - delta`` (where its stored key stands).

    In torch a save of a cold 8K-token prompt was, per layer, two gathers, a rotation and
    two strided copies: ~160 launches and ~13 ms of H100 time on the request's path
    (torch.profiler); here every element is read and written once, in one launch.
    """
    _launch(blocks, 0, k_views, v_views, rows, spec, rotate, True, block_rows, num_warps)


def _launch(staged: torch.Tensor, first_layer: int, k_views: Sequence[torch.Tensor],
            v_views: Sequence[torch.Tensor], rows: torch.Tensor, spec: Optional[RopeSpec],
            rotate: bool, gather: bool, block_rows: int, num_warps: int) -> None:
    n_rows = rows.shape[1]
    if n_rows == 0:
        return
    heads, dim = staged.shape[-2], staged.shape[-1]
    if rotate:
        if spec is None:
            raise ValueError("rotate=True needs the model's RopeSpec")
        half, inv = spec.rotary_dim // 2, _inv_freq_on(spec, staged.device)
        neox = spec.is_neox_style
    else:
        half, inv, neox = dim // 2, rows, True  # inv unused
    tail = dim - 2 * half
    k0, v0 = k_views[0], v_views[0]
    offsets = _offsets_on(tuple(_element_offsets(k_views)), tuple(_element_offsets(v_views)), staged.device)
    rows = rows if rows.is_contiguous() else rows.contiguous()
    grid = (triton.cdiv(n_rows, block_rows), len(k_views))
    layers = (staged.shape[1],) if gather else (first_layer, staged.shape[1])
    _jit(interpreting(), gather)[grid](
        staged, k0, v0, offsets[0], offsets[1],
        rows[0], rows[1], rows[2], rows[3], inv,
        n_rows, *layers, staged.shape[3], k0.shape[1], heads,
        k0.stride(0), k0.stride(1), k0.stride(2), v0.stride(0), v0.stride(1), v0.stride(2),
        HEAD_DIM=dim, HALF=half, HALF_P=_next_pow2(half), TAIL=tail, TAIL_P=_next_pow2(max(tail, 1)),
        DIM_P=_next_pow2(dim), BLOCK_N=block_rows, BLOCK_H=_next_pow2(heads),
        NEOX=neox, ROTATE=rotate, num_warps=num_warps,
    )
