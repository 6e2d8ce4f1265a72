"""Rotary position embedding (RoPE) as the served model applies it, plus delta rotation.

Blend stores a chunk's K rotated at chunk-local positions ``0..L-1`` and reuses it at
``start..start+L-1``. RoPE is a rotation of each 2-D pair by ``position * inv_freq``,
so rotations compose additively: rotating a cached key by ``delta = new - old`` gives
exactly the key the model would have produced at the new position. That only holds if
we use *the model's own* frequencies and pair layout, hence this module reproduces
transformers' ``default``/``linear``/``llama3``/``yarn`` inverse frequencies exactly,
both pair layouts (NeoX: first half with second half; GPT-J: interleaved pairs) and
partial rotary (only the first ``rotary_dim`` dims rotate).

Scaling types whose frequencies depend on the sequence length ("dynamic" NTK,
"longrope" with its short/long switch) are refused: a cached key rotated under one
length cannot be re-rotated exactly for another.

Pure torch; never imports vLLM. On CUDA the rotation of cached keys dispatches to a
Triton kernel (``rope_triton``, imported lazily so this module works without Triton):
see :func:`apply_rotation` and the ``UCM_ROPE_KERNEL`` variable.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ucm.kernel_choice import KernelChoice
from ucm.sparse.blend.transfer import to_device

logger = logging.getLogger(__name__)

KERNEL_ENV = "UCM_ROPE_KERNEL"
KERNEL = KernelChoice(KERNEL_ENV, ("auto", "torch", "triton"), module_name="ucm.sparse.blend.rope_triton",
                      label="Triton RoPE kernel")
"""``UCM_ROPE_KERNEL``: auto (Triton on CUDA when importable) | torch | triton."""

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Keys each scaled type needs (besides what it can default); checked at construction so
# a bad config fails at engine start, not inside a forward pass.
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": (),
}


def _rope_type(scaling: Optional[dict]) -> str:
    """HF spells the type ``rope_type`` (new) or ``type`` (old); absent means default."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")) or "default")


@dataclass(frozen=True)
class RopeSpec:
    """Everything that determines a model's rotary embedding.

    ``scaling`` is the HF ``rope_scaling``/``rope_parameters`` dict (or None for plain
    RoPE). It is excluded from the hash so a spec can key a cache; equality still
    compares it.
    """

    head_dim: int
    rotary_dim: int
    base: float = 10000.0
    is_neox_style: bool = True
    scaling: Optional[dict] = field(default=None, hash=False)
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}"
            )
        rope_type = _rope_type(self.scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
                "Length-dependent scaling (dynamic NTK, longrope) cannot be delta-rotated exactly."
            )
        for key in _REQUIRED_KEYS.get(rope_type, ()):
            if self.scaling.get(key) is None:  # type: ignore[union-attr]
                raise ValueError(f"RoPE scaling type {rope_type!r} needs key {key!r} in its parameters")
        if self.scaling is not None:
            # Private copy: a caller mutating its dict later must not change a cached spec.
            object.__setattr__(self, "scaling", dict(self.scaling))

    @property
    def rope_type(self) -> str:
        return _rope_type(self.scaling)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "RopeSpec":
        """Build the spec from a transformers config (Llama, Mistral, Qwen2, Qwen3).

        Reads both the newer ``rope_parameters`` layout (theta and partial factor
        inside the dict) and the older ``rope_theta`` + ``rope_scaling`` attributes.
        All these architectures use the NeoX pair layout.
        """
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        params = dict(params)
        nested = [v for v in params.values() if isinstance(v, dict)]
        if nested:
            # Per-layer-type RoPE (e.g. sliding vs full attention); fine only if all agree.
            if any(n != nested[0] for n in nested):
                raise ValueError("per-layer-type RoPE parameters differ; Blend needs one RoPE for all layers")
            params = dict(nested[0])
        base = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        base = 10000.0 if base is None else float(base)
        partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        partial = 1.0 if partial is None else float(partial)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        max_pos = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        rope_type = _rope_type(params)
        scaling: Optional[dict] = None
        if rope_type != "default":
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
            scaling["rope_type"] = rope_type
            if rope_type in ("llama3", "yarn"):
                orig = getattr(cfg, "original_max_position_embeddings", None)
                scaling.setdefault("original_max_position_embeddings", orig or max_pos)
        spec = cls(
            head_dim=int(head_dim),
            rotary_dim=int(head_dim * partial),
            base=base,
            is_neox_style=True,
            scaling=scaling,
            max_position_embeddings=max_pos,
        )
        logger.debug("RoPE from %s: %s", type(cfg).__name__, spec)
        return spec


def _base_inv_freq(spec: RopeSpec) -> torch.Tensor:
    dim = spec.rotary_dim
    return 1.0 / (spec.base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3_inv_freq(spec: RopeSpec, s: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    inv_freq = _base_inv_freq(spec)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings") or spec.max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq_and_scale(spec: RopeSpec, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between.

    ``attention_factor`` (mscale) multiplies cos/sin, i.e. scales q·k by mscale².
    """
    dim, base = spec.rotary_dim, spec.base
    orig = s.get("original_max_position_embeddings") or spec.max_position_embeddings
    factor = s.get("factor")
    if factor is None:
        factor = spec.max_position_embeddings / orig

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


@functools.lru_cache(maxsize=64)
def inv_freq_and_scale(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32, CPU) and the cos/sin scale.

    Mirrors transformers' ``ROPE_INIT_FUNCTIONS`` so rotated keys match the model's.
    Cached per spec; callers must not modify the returned tensor.
    """
    s = spec.scaling or {}
    rope_type = spec.rope_type
    if rope_type == "default":
        return _base_inv_freq(spec), 1.0
    if rope_type == "linear":
        return _base_inv_freq(spec) / s["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(spec, s), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq_and_scale(spec, s)
    raise ValueError(f"unsupported RoPE scaling type {rope_type!r}")  # unreachable: checked in RopeSpec


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x`` by per-token angles; returns a new tensor.

    ``cos``/``sin`` are ``[tokens, rotary_dim // 2]`` float32; they broadcast over the
    heads dim (-2) and any leading dims. Math is float32, the result has x's dtype.
    """
    r = spec.rotary_dim
    out = _rotate_pairs(x[..., :r], cos, sin, spec.is_neox_style)
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)


def _rotate_pairs(rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate every (a, b) pair of ``rot`` (all its dims rotary): NeoX pairs i with i + r/2,
    GPT-J pairs 2i with 2i + 1."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    r = rot.shape[-1]
    xf = rot.to(torch.float32)
    if neox:
        x1, x2 = xf[..., : r // 2], xf[..., r // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(rot.dtype)


def _check(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> None:
    if x.shape[-1] != spec.head_dim:
        raise ValueError(f"last dim of x is {x.shape[-1]}, spec.head_dim is {spec.head_dim}")
    if x.dim() < 3 or positions.dim() != 1 or positions.shape[0] != x.shape[-3]:
        raise ValueError(
            f"x must be [..., tokens, heads, head_dim] with positions [tokens]; got {tuple(x.shape)} "
            f"and {tuple(positions.shape)}"
        )


def rotate(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Apply RoPE like the model does: angles ``float32(pos) * inv_freq`` in float32,
    cos/sin scaled by the type's attention scaling (YaRN mscale), result in x's dtype.

    x: ``[..., tokens, heads, head_dim]``; positions: ``LongTensor[tokens]``.
    """
    _check(x, positions, spec)
    _, scale = inv_freq_and_scale(spec)
    angles = positions.to(torch.float32)[:, None] * _inv_freq_on(spec, x.device)[None, :]
    return _apply(x, angles.cos() * scale, angles.sin() * scale, spec)


def _kernels_for(x: torch.Tensor) -> tuple[Any, bool]:
    """(kernel module or None for the torch path, whether the kernel is forced).

    ``auto`` uses the kernel for CUDA keys it supports; ``triton`` insists and raises a
    clear error where it cannot (no Triton, or a CPU tensor without TRITON_INTERPRET=1).
    """
    mode = KERNEL.mode()
    if mode == "torch" or (mode == "auto" and not x.is_cuda):
        return None, False
    mod = KERNEL.module()
    if mode == "auto":
        return mod, False
    if mod is None:
        raise RuntimeError(f"{KERNEL_ENV}=triton but Triton cannot be imported; install triton or use auto/torch")
    if not x.is_cuda and not mod.interpreting():
        raise RuntimeError(
            f"{KERNEL_ENV}=triton needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to "
            "interpret the kernel on CPU, or use auto/torch")
    return mod, True


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """:func:`_apply` with kernel dispatch: rotate the first ``rotary_dim`` dims of
    ``x[..., tokens, heads, head_dim]`` by per-token ``cos``/``sin`` (float32
    ``[tokens, rotary_dim // 2]``, as :func:`_delta_cos_sin` builds them); new tensor.

    On CUDA (``UCM_ROPE_KERNEL=auto``) one Triton pass; the torch path is ``_apply``
    itself. Other cos/sin broadcasts ``_apply`` accepts fall back to torch under auto.
    """
    mod, forced = _kernels_for(x)
    if mod is not None and (forced or mod.supports_tables(x, cos, sin, spec)):
        return mod.apply_rotation_triton(x, cos, sin, spec)
    return _apply(x, cos, sin, spec)


@functools.lru_cache(maxsize=64)
def _inv_freq_on(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """Inverse frequencies (float32) on ``device``, copied once per (spec, device): the
    torch path and the Triton kernel both read them, and a launch then costs no copy."""
    return to_device(inv_freq_and_scale(spec)[0], device)


def _delta_cos_sin(
    delta: torch.Tensor, spec: RopeSpec, from_positions: Optional[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation that moves a key by ``delta`` positions (no mscale).

    The angle is formed in float64. With ``from_positions`` it is the difference of the
    float32 angles the model itself uses at the old and the new position, so the result
    matches a direct ``rotate`` at the new position to float32 rounding even at large
    positions (where float32 angles are only accurate to ~ulp(pos * inv_freq)).
    """
    inv = _inv_freq_on(spec, torch.device(device))
    if from_positions is None:
        angles = delta.to(torch.float64)[:, None] * inv.to(torch.float64)[None, :]
    else:
        old = to_device(from_positions, device)
        new = old + to_device(delta, device)
        new_a = (new.to(torch.float32)[:, None] * inv[None, :]).to(torch.float64)
        old_a = (old.to(torch.float32)[:, None] * inv[None, :]).to(torch.float64)
        angles = new_a - old_a
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def _as_delta(delta: "torch.Tensor | int", x: torch.Tensor) -> torch.Tensor:
    """Accept one shift for all tokens (an int or 0-d tensor) as well as one per token."""
    if not isinstance(delta, torch.Tensor):
        return torch.full((x.shape[-3],), int(delta), dtype=torch.int64, device=x.device)  # no copy
    delta = to_device(delta.to(torch.int64), x.device)
    return delta.expand(x.shape[-3]) if delta.dim() == 0 else delta


def delta_rotate(
    x: torch.Tensor, delta: "torch.Tensor | int", spec: RopeSpec, from_positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Move already-rotated keys by ``delta`` positions (per token, or one int; may be negative).

    ``delta_rotate(rotate(k, p), q - p) == rotate(k, q)`` for every supported flavour:
    rotations compose additively, and the YaRN mscale is *not* applied again (it is
    already inside the cached key). V is never rotated. Pass ``from_positions`` (the
    positions the keys were rotated at) for float32-faithful results at large positions.
    """
    delta = _as_delta(delta, x)
    _check(x, delta, spec)
    mod, forced = _kernels_for(x)
    if mod is not None and (forced or mod.supports(x, spec)):
        # Angles formed in-kernel, in the same precision steps as _delta_cos_sin.
        return mod.delta_rotate_triton(x, delta, spec, from_positions)
    cos, sin = _delta_cos_sin(delta, spec, from_positions, x.device)
    return _apply(x, cos, sin, spec)


def delta_rotate_(
    x: torch.Tensor, delta: "torch.Tensor | int", spec: RopeSpec, from_positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """In-place :func:`delta_rotate`; works on views (e.g. a slice of a paged KV cache).

    Only the rotary part is written; the pass-through dims are left untouched.
    """
    delta = _as_delta(delta, x)
    _check(x, delta, spec)
    mod, forced = _kernels_for(x)
    if mod is not None and (forced or mod.supports(x, spec)):
        return mod.delta_rotate_triton(x, delta, spec, from_positions, out=x)
    cos, sin = _delta_cos_sin(delta, spec, from_positions, x.device)
    r = spec.rotary_dim
    x[..., :r].copy_(_rotate_pairs(x[..., :r], cos, sin, spec.is_neox_style))
    return x
