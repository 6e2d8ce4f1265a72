"""Triton delta-RoPE kernel against the torch reference, run on CPU by Triton's interpreter.

``rope_triton`` decorates its kernel lazily, once per interpreter mode, reading
TRITON_INTERPRET at launch; so setting the variable for this module (fixture below) is
enough whatever other test modules imported first. On a GPU box the same comparisons run
compiled in ``benchmarks/rope_kernel.py``.
"""

from __future__ import annotations

import pytest
import torch

from ucm.sparse.blend import rope as rope_mod
from ucm.sparse.blend import rope_triton  # needs triton (no GPU): a test dependency, never skipped
from ucm.sparse.blend.rope import (RopeSpec, _apply, _delta_cos_sin, apply_rotation, delta_rotate,
                                   delta_rotate_)
from tests.test_rope import SCALINGS  # the same scaling configs as the torch-path tests

HEAD_DIM = 64
# 1 bf16 ulp relative (8 significant bits) plus a hair for values that cancel to ~0.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv(rope_mod.KERNEL_ENV, raising=False)
        yield


def _spec(scaling: str = "default", neox: bool = True, rotary_dim: int = HEAD_DIM) -> RopeSpec:
    return RopeSpec(head_dim=HEAD_DIM, rotary_dim=rotary_dim, base=10000.0, is_neox_style=neox,
                    scaling=SCALINGS[scaling], max_position_embeddings=1024)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(n: int, heads: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, deltas (negative, zero and positive) and large source positions."""
    g = _gen(seed)
    k = torch.randn(n, heads, HEAD_DIM, generator=g)
    delta = torch.randint(-40000, 40000, (n,), generator=g)
    delta[::5] = 0
    pos = torch.randint(0, 100000, (n,), generator=g)
    return k, delta, pos


def _reference(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """The torch path in float32, cast to k's dtype (what the kernel must reproduce)."""
    return _apply(k.float(), cos, sin, spec).to(k.dtype)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[ref.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 32, 48])  # 48: half=24, not a power of two
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_tables_match_apply(neox, rotary_dim, heads, dtype):
    spec = _spec("llama3", neox, rotary_dim)
    k, delta, pos = _case(37, heads, seed=heads + rotary_dim)
    k = k.to(dtype)
    cos, sin = _delta_cos_sin(delta, spec, pos, k.device)
    out = rope_triton.apply_rotation_triton(k, cos, sin, spec)
    _close(out, _reference(k, cos, sin, spec))
    if rotary_dim < HEAD_DIM:
        assert torch.equal(out[..., rotary_dim:], k[..., rotary_dim:])
    moved = delta != 0
    assert (out[moved].float() - k[moved].float()).abs().amax() > 0.5  # really rotated


@pytest.mark.parametrize("with_from", [True, False], ids=["from_positions", "no_positions"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_in_kernel_angles_match_delta_rotate(scaling, neox, with_from, monkeypatch):
    """Angles formed in the kernel (no cos/sin tables) agree with _delta_cos_sin + _apply,
    including at positions ~1e5 where float32 angle rounding is ~1e-2 rad."""
    spec = _spec(scaling, neox, HEAD_DIM if neox else 48)
    k, delta, pos = _case(29, 4, seed=len(scaling))
    frm = pos if with_from else None
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "torch")
    ref = delta_rotate(k, delta, spec, from_positions=frm)
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "triton")
    out = delta_rotate(k, delta, spec, from_positions=frm)
    _close(out, ref)
    kb = k.to(torch.bfloat16)
    _close(delta_rotate(kb, delta, spec, from_positions=frm),
           _reference(kb, *_delta_cos_sin(delta, spec, frm, kb.device), spec))


def test_int_delta_and_zero_delta(monkeypatch):
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "triton")
    spec = _spec("yarn_mscale", rotary_dim=32)
    k, _, _ = _case(9, 2)
    torch.testing.assert_close(delta_rotate(k, 0, spec), k, rtol=0, atol=0)  # no mscale, no drift
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "torch")
    ref = delta_rotate(k, -123, spec)
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "triton")
    _close(delta_rotate(k, -123, spec), ref)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_in_place_on_a_view_leaves_tail_and_neighbours(neox, monkeypatch):
    spec = _spec("linear", neox, rotary_dim=48)
    k, delta, pos = _case(10, 3)
    cache = torch.zeros(2, 10, 3, HEAD_DIM)
    cache[0] = k
    cache[1] = 7.0
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "torch")
    ref = delta_rotate_(k.clone(), delta, spec, from_positions=pos)
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "triton")
    out = delta_rotate_(cache[0], delta, spec, from_positions=pos)
    assert out.data_ptr() == cache[0].data_ptr()
    _close(cache[0], ref)
    assert torch.equal(cache[0, ..., 48:], k[..., 48:])
    assert torch.equal(cache[1], torch.full((10, 3, HEAD_DIM), 7.0))


def test_strided_leading_dims_and_small_tiles():
    """Head-strided views, stacked layers sharing one table (row % T) and a tile config
    that splits rows and heads over a 2-D grid with masked edges."""
    spec = _spec("default", True, 48)
    k, delta, pos = _case(13, 6, seed=3)
    cos, sin = _delta_cos_sin(delta, spec, pos, k.device)
    wide = torch.randn(13, 12, HEAD_DIM, generator=_gen(4))
    view = wide[:, ::2]  # head stride 2 * HEAD_DIM
    _close(rope_triton.apply_rotation_triton(view, cos, sin, spec), _reference(view, cos, sin, spec))
    transposed = torch.randn(6, 13, HEAD_DIM, generator=_gen(5)).transpose(0, 1)  # row stride D
    _close(rope_triton.apply_rotation_triton(transposed, cos, sin, spec), _reference(transposed, cos, sin, spec))
    layers = torch.randn(3, 13, 6, HEAD_DIM, generator=_gen(6)).to(torch.bfloat16)
    _close(rope_triton.apply_rotation_triton(layers, cos, sin, spec), _reference(layers, cos, sin, spec))
    small = rope_triton.LaunchConfig(target_pairs=32, num_warps=1, max_block_h=4)  # 2 head blocks
    _close(rope_triton.apply_rotation_triton(k, cos, sin, spec, config=small), _reference(k, cos, sin, spec))
    _close(rope_triton.delta_rotate_triton(layers, delta, spec, pos, config=small),
           _reference(layers, cos, sin, spec))


def test_empty():
    spec = _spec()
    k = torch.empty(0, 8, HEAD_DIM, dtype=torch.bfloat16)
    cos = sin = torch.empty(0, HEAD_DIM // 2)
    assert rope_triton.apply_rotation_triton(k, cos, sin, spec).shape == (0, 8, HEAD_DIM)
    out = rope_triton.delta_rotate_triton(k, torch.empty(0, dtype=torch.long), spec)
    assert out.shape == (0, 8, HEAD_DIM) and out.dtype == torch.bfloat16


def test_comparison_is_sensitive():
    """A sign slip (rotating the wrong way) is far outside the tolerance used above."""
    spec = _spec()
    k, delta, pos = _case(16, 2)
    cos, sin = _delta_cos_sin(delta, spec, pos, k.device)
    out = rope_triton.apply_rotation_triton(k, cos, sin, spec)
    with pytest.raises(AssertionError):
        _close(out, _reference(k, cos, -sin, spec))


def test_dispatch(monkeypatch):
    spec = _spec("llama3")
    k, delta, pos = _case(11, 2)
    cos, sin = _delta_cos_sin(delta, spec, pos, k.device)
    calls = []
    real = rope_triton.apply_rotation_triton
    monkeypatch.setattr(rope_triton, "apply_rotation_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    for mode in ("torch", "auto"):  # auto on a CPU tensor never touches the kernel
        monkeypatch.setenv(rope_mod.KERNEL_ENV, mode)
        assert torch.equal(apply_rotation(k, cos, sin, spec), _apply(k, cos, sin, spec))
        assert torch.equal(delta_rotate(k, delta, spec, from_positions=pos), _apply(k, cos, sin, spec))
    assert not calls

    monkeypatch.setenv(rope_mod.KERNEL_ENV, "triton")
    _close(apply_rotation(k, cos, sin, spec), _apply(k, cos, sin, spec))
    assert calls

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        apply_rotation(k, cos, sin, spec)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        delta_rotate(k, delta, spec)
    monkeypatch.setenv(rope_mod.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="UCM_ROPE_KERNEL"):
        apply_rotation(k, cos, sin, spec)
