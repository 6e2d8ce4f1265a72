"""Triton kernel for Blend's (delta-)RoPE on cached keys: one pass, read K once, write once.

The torch path (:func:`ucm.sparse.blend.rope._apply`) slices, upcasts, multiplies and
concatenates in ~8 launches and as many full-size temporaries; this kernel does the same
math in registers, so on a GPU it runs at close to memory bandwidth.

Layout
------
Keys are ``x[..., T, H, D]`` (any float16/bfloat16/float32), viewed as rows
``[R = prod(leading) * T, H, D]`` with a row stride and a head stride and a contiguous
last dim. Program ``(i, j)`` of the 2-D grid ``(ceil(R / BLOCK_N), ceil(H / BLOCK_H))``
handles the tile of ``BLOCK_N`` rows x ``BLOCK_H`` heads, with all ``rotary_dim / 2`` pairs
of each head (``HALF_P`` = next power of two, masked):

* NeoX (rotate-half) pairs dim ``i`` with ``i + rotary_dim/2``: two contiguous loads per
  head. GPT-J (interleaved) pairs ``2i`` with ``2i + 1``: two stride-2 loads that hit the
  same cache lines.
* Each row's angles ``[BLOCK_N, HALF_P]`` are formed once per program and broadcast over
  its heads, so per-token angle traffic is amortised over H heads. Row ``r`` uses table
  row ``r % T``, so leading dims (e.g. stacked layers) broadcast like in ``_apply``.
* Dims ``rotary_dim..D`` pass through: copied for an out-of-place result, untouched when
  rotating in place.

Angles come from either source (constexpr ``ANGLES``):

* ``0`` - tables: ``cos``/``sin`` ``[T, rotary_dim/2]`` float32, exactly what
  ``_delta_cos_sin`` builds (compute once, reuse for every layer).
* ``1`` - in-kernel from an int64 ``delta[T]`` and the float32 ``inv_freq``:
  ``angle = f64(delta) * f64(inv_freq)``, cos/sin in float64, rounded to float32, as
  ``_delta_cos_sin(delta, spec, None, ...)`` does.
* ``2`` - in-kernel with ``from_positions[T]``: ``f64(f32(new) * inv) - f64(f32(old) * inv)``,
  the difference of the model's own float32 angles, as ``_delta_cos_sin`` with positions.

Both in-kernel modes skip materialising cos/sin (8 bytes per pair per token) and the
five or so torch launches that build them. The rotation itself is float32
``x1*cos - x2*sin`` / ``x2*cos + x1*sin`` (the compiler may fuse into FMAs: ~1 ulp of
float32 from torch), rounded to x's dtype on store.

Interpreter: ``triton.jit`` decides at decoration time whether to interpret, so the kernel
is decorated lazily, once per mode (``TRITON_INTERPRET`` read at launch). Its helpers
(:func:`pair_dims`, :func:`moved_angles`, shared with :mod:`load_triton`) and
triton.language's own are decorated at import, so interpreting needs
``TRITON_INTERPRET=1`` before Triton is imported (tests/conftest.py).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .rope import RopeSpec, _inv_freq_on
from .transfer import to_device

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "on", "yes")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and warps. ``target_pairs`` = rotation pairs per program (rows x heads x
    pairs); 2048 pairs = 8 KiB of bf16 K read per program, enough bytes in flight per SM
    to saturate HBM on H100 without spilling registers."""

    target_pairs: int = 2048
    num_warps: int = 4
    max_block_h: int = 16


DEFAULT_CONFIG = LaunchConfig()


@triton.jit
def pair_dims(pairs, HALF: tl.constexpr, NEOX: tl.constexpr):
    """Offsets ``[1, 1, HALF_P]`` of the two dims of each rotation pair: ``i`` and
    ``i + rotary_dim/2`` (NeoX, rotate-half), or ``2i`` and ``2i + 1`` (GPT-J)."""
    if NEOX:
        i1 = pairs[None, None, :]
        i2 = i1 + HALF
    else:
        i1 = 2 * pairs[None, None, :]
        i2 = i1 + 1
    return i1, i2


@triton.jit
def moved_angles(new, old, inv):
    """cos/sin ``[N, HALF_P]`` float32 of the rotation from positions ``old`` to ``new``:
    the difference of the model's own float32 angles, taken in float64 (as
    ``rope._delta_cos_sin`` with ``from_positions``)."""
    new_a = (new.to(tl.float32)[:, None] * inv[None, :]).to(tl.float64)
    old_a = (old.to(tl.float32)[:, None] * inv[None, :]).to(tl.float64)
    ang = new_a - old_a
    return tl.cos(ang).to(tl.float32), tl.sin(ang).to(tl.float32)


def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, delta_ptr, from_ptr, inv_ptr,
    n_rows, n_heads, n_table,
    stride_xn, stride_xh, stride_on, stride_oh, stride_cn,
    HALF: tl.constexpr, HALF_P: tl.constexpr, TAIL: tl.constexpr, TAIL_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    NEOX: tl.constexpr, ANGLES: tl.constexpr, COPY_TAIL: tl.constexpr, REPEAT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    heads = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    pairs = tl.arange(0, HALF_P)
    row_ok = rows < n_rows
    if REPEAT:
        trow = rows % n_table
    else:
        trow = rows
    pair_ok = pairs < HALF

    # ---- angles for this tile's rows: [BLOCK_N, HALF_P] float32 -----------------------
    if ANGLES == 0:
        c_off = trow[:, None] * stride_cn + pairs[None, :]
        c_mask = row_ok[:, None] & pair_ok[None, :]
        cos = tl.load(cos_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
    else:
        delta = tl.load(delta_ptr + trow, mask=row_ok, other=0).to(tl.int64)
        inv = tl.load(inv_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
        if ANGLES == 1:
            ang = delta.to(tl.float64)[:, None] * inv.to(tl.float64)[None, :]
            cos = tl.cos(ang).to(tl.float32)
            sin = tl.sin(ang).to(tl.float32)
        else:
            old = tl.load(from_ptr + trow, mask=row_ok, other=0).to(tl.int64)
            cos, sin = moved_angles(old + delta, old, inv)
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    # ---- rotate the pairs of every head in the tile ----------------------------------
    ok = row_ok[:, None, None] & (heads < n_heads)[None, :, None]  # [BLOCK_N, BLOCK_H, 1]
    x_base = x_ptr + rows[:, None, None] * stride_xn + heads[None, :, None] * stride_xh
    o_base = out_ptr + rows[:, None, None] * stride_on + heads[None, :, None] * stride_oh
    if HALF_P != HALF:
        m = ok & pair_ok[None, None, :]
    else:
        m = ok
    i1, i2 = pair_dims(pairs, HALF, NEOX)
    x1 = tl.load(x_base + i1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + i2, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    tl.store(o_base + i1, o1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(o_base + i2, o2.to(out_ptr.dtype.element_ty), mask=m)

    # ---- pass-through dims (partial rotary) -------------------------------------------
    if COPY_TAIL:
        t = tl.arange(0, TAIL_P)[None, None, :]
        mt = ok & (t < TAIL)
        tail = tl.load(x_base + 2 * HALF + t, mask=mt, other=0.0)
        tl.store(o_base + 2 * HALF + t, tail, mask=mt)


def interpreting() -> bool:
    """Whether Triton would interpret (CPU tensors allowed) if a kernel were decorated now."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


@functools.lru_cache(maxsize=2)
def _jit(interpret: bool) -> Any:
    """Decorate once per mode; ``triton.jit`` reads TRITON_INTERPRET when it decorates."""
    del interpret  # cache key only
    # Row counts vary per call: do not compile a variant per divisibility of N.
    return triton.jit(_rope_kernel, do_not_specialize=["n_rows", "n_table"])


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def supports(x: torch.Tensor, spec: RopeSpec) -> bool:
    """Whether the kernel handles ``x`` (otherwise use the torch path)."""
    return (x.dtype in SUPPORTED_DTYPES and x.dim() >= 3 and x.shape[-1] == spec.head_dim
            and (x.is_cuda or interpreting()))


def supports_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> bool:
    """Table mode needs float32 ``[T, rotary_dim/2]`` cos/sin on x's device (what
    ``_delta_cos_sin`` builds); other broadcasts ``_apply`` accepts go to torch."""
    want = (x.shape[-3], spec.rotary_dim // 2) if x.dim() >= 3 else None
    return (supports(x, spec) and tuple(cos.shape) == want and tuple(sin.shape) == want
            and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and cos.device == x.device and sin.device == x.device)


def _check_device(x: torch.Tensor) -> bool:
    """Raise unless the kernel can take x; returns whether we interpret (CPU tensors)."""
    interpret = interpreting()
    if not x.is_cuda and not interpret:
        raise RuntimeError(
            f"the Triton RoPE kernel needs a CUDA tensor, got one on {x.device}; set "
            "UCM_ROPE_KERNEL=torch (or auto), or TRITON_INTERPRET=1 to run it on CPU")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton RoPE kernel handles float16/bfloat16/float32 keys, got {x.dtype}")
    return interpret


@functools.lru_cache(maxsize=256)
def _geometry(head_dim: int, rotary_dim: int, heads: int, cfg: LaunchConfig) -> tuple[int, ...]:
    """(HALF, HALF_P, TAIL, TAIL_P, BLOCK_H, BLOCK_N) for a head layout; cached because
    the launch path runs once per layer per step and Python time there is host latency."""
    half, tail = rotary_dim // 2, head_dim - rotary_dim
    half_p = _next_pow2(half)
    block_h = min(_next_pow2(heads), _next_pow2(cfg.max_block_h))
    block_n = _next_pow2(max(1, cfg.target_pairs // (block_h * half_p)))
    return half, half_p, tail, _next_pow2(max(tail, 1)), block_h, block_n


def _launch(x: torch.Tensor, spec: RopeSpec, angles: int, tables: tuple[Optional[torch.Tensor], ...],
            out: Optional[torch.Tensor], config: Optional[LaunchConfig]) -> torch.Tensor:
    """Shared launcher. ``out is x`` rotates in place (rotary dims only); ``out is None``
    returns a new contiguous tensor with the pass-through dims copied."""
    interpret = _check_device(x)
    if x.dim() < 3 or x.shape[-1] != spec.head_dim:
        raise ValueError(f"x must be [..., tokens, heads, head_dim={spec.head_dim}], got {tuple(x.shape)}")
    T, H, D = x.shape[-3], x.shape[-2], x.shape[-1]
    in_place = out is x
    if in_place:
        try:
            rows_x = x.view(-1, H, D) if x.dim() > 3 else x
        except RuntimeError:
            rows_x = None
        if rows_x is None or rows_x.stride(-1) != 1:
            # Not expressible as strided rows: rotate a contiguous copy, write the rotary part back.
            res = _launch(x.contiguous(), spec, angles, tables, None, config)
            x[..., : spec.rotary_dim].copy_(res[..., : spec.rotary_dim])
            return x
        rows_o = result = x
    else:
        rows_x = x if x.dim() == 3 else x.reshape(-1, H, D)
        if rows_x.stride(-1) != 1:
            rows_x = rows_x.contiguous()
        result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows_o = result if x.dim() == 3 else result.view(-1, H, D)
    R = rows_x.shape[0]
    if R == 0 or H == 0:
        return result
    half, half_p, tail, tail_p, block_h, block_n = _geometry(D, spec.rotary_dim, H, config or DEFAULT_CONFIG)
    if block_n > R:  # tiny inputs: do not spread a handful of rows over idle lanes
        block_n = _next_pow2(R)
    if angles == 0:
        cos, sin = tables
        c_stride = cos.stride(0)
        delta = frm = inv = cos  # unused pointers; any valid tensor
    else:
        delta, frm, inv = tables
        cos = sin = inv
        c_stride = 0
        frm = delta if frm is None else frm
    grid = ((R + block_n - 1) // block_n, (H + block_h - 1) // block_h)
    sxn, sxh = rows_x.stride(0), rows_x.stride(1)
    son, soh = (sxn, sxh) if rows_o is rows_x else (rows_o.stride(0), rows_o.stride(1))
    _jit(interpret)[grid](
        rows_x, rows_o, cos, sin, delta, frm, inv,
        R, H, T,
        sxn, sxh, son, soh, c_stride,
        HALF=half, HALF_P=half_p, TAIL=tail, TAIL_P=tail_p,
        BLOCK_N=block_n, BLOCK_H=block_h,
        NEOX=spec.is_neox_style, ANGLES=angles, COPY_TAIL=tail > 0 and not in_place,
        REPEAT=R != T,
        num_warps=(config or DEFAULT_CONFIG).num_warps,
    )
    return result


def _index_vector(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64, contiguous, 1-D on ``device``; no copies when it already is."""
    if t.dtype != torch.int64 or t.device != device:
        t = to_device(t.to(torch.int64), device)
    if t.dim() != 1:
        t = t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def apply_rotation_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec,
                          out: Optional[torch.Tensor] = None,
                          config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """Kernel twin of ``_apply(x, cos, sin, spec)``: cos/sin float32 ``[T, rotary_dim/2]``.

    ``out=x`` rotates in place (pass-through dims untouched); otherwise a new tensor.
    """
    want = (x.shape[-3] if x.dim() >= 3 else -1, spec.rotary_dim // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(f"cos/sin must be [tokens, rotary_dim/2] = {want}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or cos.device != x.device or cos.stride(-1) != 1:
        cos = to_device(cos.to(torch.float32), x.device).contiguous()
    if sin.dtype != torch.float32 or sin.device != x.device or sin.stride() != cos.stride():
        sin = to_device(sin.to(torch.float32), x.device).contiguous()
        cos = cos.contiguous()
    return _launch(x, spec, 0, (cos, sin), out, config)


def delta_rotate_triton(x: torch.Tensor, delta: torch.Tensor, spec: RopeSpec,
                        from_positions: Optional[torch.Tensor] = None,
                        out: Optional[torch.Tensor] = None,
                        config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """Kernel twin of ``delta_rotate`` (angles formed in-kernel; ``delta`` int ``[T]``).

    Matches ``_apply(x, *_delta_cos_sin(delta, spec, from_positions, dev), spec)`` to
    float32 rounding. ``out=x`` rotates in place.
    """
    T = x.shape[-3] if x.dim() >= 3 else -1
    delta = _index_vector(delta, x.device)
    if delta.shape[0] != T:
        raise ValueError(f"delta must have one entry per token ({T}), got {tuple(delta.shape)}")
    frm = None
    if from_positions is not None:
        frm = _index_vector(from_positions, x.device)
        if frm.shape[0] != T:
            raise ValueError(f"from_positions must have one entry per token ({T}), got {tuple(frm.shape)}")
    angles = 1 if frm is None else 2
    return _launch(x, spec, angles, (delta, frm, _inv_freq_on(spec, x.device)), out, config)
