"""The one-launch load kernel (``load_triton.scatter_blocks``) against the per-layer torch
path of ``kv_load.write_layers``, run on CPU by Triton's interpreter.

Both write staged ``[blocks, layers, 2, T, H, D]`` rows into paged caches of the two
FLASH_ATTN layouts vLLM uses (0.26: K and V packed in the last dim; 0.32: K and V
planes), one separately allocated cache per layer as vLLM does.
"""

from __future__ import annotations

import pytest
import torch

from ucm.engine import kv_load
from ucm.engine.kv_layout import flash_attn_view, token_slots
from ucm.sparse.blend.rope import RopeSpec, rotate

HEADS, DIM, T, BS, NUM_BLOCKS = 2, 16, 4, 8, 12


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _caches(layout: str, layers: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, HEADS, BS, 2 * DIM) if layout == "packed" else (2, NUM_BLOCKS, BS, HEADS, DIM)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]


def _load(n_blocks: int, staged_layers: int, dtype: torch.dtype, full_rows: bool, seed: int):
    """Staged blocks and the [4, R] rows of a load: a RAG chunk saved at position 0
    placed at position 37 (delta 37), into a scattered block table."""
    g = torch.Generator().manual_seed(seed)
    staged = torch.randn(n_blocks, staged_layers, 2, T, HEADS, DIM, generator=g).to(dtype)
    source = torch.arange(n_blocks * T)
    if not full_rows:
        source = source[1:-1]  # a partial first and last block
    position = 37 + source
    delta = torch.full_like(source, 37)
    table = torch.randperm(NUM_BLOCKS, generator=g)
    slot = token_slots(table, position, BS)
    return staged, torch.stack([source, slot, position, delta])


SPECS = {
    "neox": RopeSpec(head_dim=DIM, rotary_dim=DIM, base=10000.0, is_neox_style=True),
    "gptj": RopeSpec(head_dim=DIM, rotary_dim=DIM, base=10000.0, is_neox_style=False),
    "partial": RopeSpec(head_dim=DIM, rotary_dim=DIM // 2, base=10000.0, is_neox_style=True),
}


def _write(mode: str, monkeypatch, caches, staged, first, rows, spec, rotate_k, full_rows):
    monkeypatch.setenv(kv_load.KERNEL_ENV, mode)
    views = [flash_attn_view(c, HEADS, DIM) for c in caches]
    kv_load.write_layers(staged, first, views, rows, spec, rotate_k, full_rows)


@pytest.mark.parametrize("layout", ["packed", "planes"])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full_rows", [True, False])
def test_kernel_equals_torch_path(monkeypatch, layout, rope, dtype, full_rows):
    spec = SPECS[rope]
    staged, rows = _load(3, 4, dtype, full_rows, seed=1)
    by_kernel = _caches(layout, 3, dtype, seed=2)
    by_torch = [c.clone() for c in by_kernel]
    before = [c.clone() for c in by_kernel]
    _write("triton", monkeypatch, by_kernel, staged, 1, rows, spec, True, full_rows)
    _write("torch", monkeypatch, by_torch, staged, 1, rows, spec, True, full_rows)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    for got, want, old in zip(by_kernel, by_torch, before):
        torch.testing.assert_close(got, want, **tol)
        assert not torch.equal(got, old)  # something was written
        changed = (got != old).reshape(-1).sum().item()
        rows_written = rows.shape[1] * HEADS * DIM * 2
        assert changed <= rows_written  # and nothing outside the loaded rows' slots


def test_loaded_key_equals_key_rotated_at_its_new_position(monkeypatch):
    """The kernel's K is what the model would have cached computing the token at its new
    position: rotate(raw, position) == kernel(rotate(raw, position - delta))."""
    spec = SPECS["neox"]
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2 * T, HEADS, DIM, generator=g)
    staged = torch.zeros(2, 1, 2, T, HEADS, DIM)
    saved_at = torch.arange(2 * T)
    staged[:, 0, 0] = rotate(raw, saved_at, spec).reshape(2, T, HEADS, DIM)
    staged[:, 0, 1] = raw.reshape(2, T, HEADS, DIM)
    position = 1000 + saved_at
    slot = token_slots(torch.tensor([5, 2, 9, 0]), position - 1000, BS)
    rows = torch.stack([saved_at, slot, position, position - saved_at])
    caches = _caches("planes", 1, torch.float32, seed=4)
    _write("triton", monkeypatch, caches, staged, 0, rows, spec, True, True)
    view = flash_attn_view(caches[0], HEADS, DIM)
    k, v = view.gather(slot)
    torch.testing.assert_close(k, rotate(raw, position, spec), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, raw)


def test_without_rotation_copies_k(monkeypatch):
    staged, rows = _load(2, 2, torch.float32, True, seed=5)
    caches = _caches("packed", 2, torch.float32, seed=6)
    _write("triton", monkeypatch, caches, staged, 0, rows, None, False, True)
    for layer, cache in enumerate(caches):
        k, v = flash_attn_view(cache, HEADS, DIM).gather(rows[1])
        flat = staged[:, layer].transpose(0, 1).reshape(2, -1, HEADS, DIM)
        assert torch.equal(k, flat[0]) and torch.equal(v, flat[1])


def test_unequal_caches_fall_back_or_refuse(monkeypatch):
    """auto takes the torch path for caches the kernel cannot address; triton refuses."""
    staged, rows = _load(2, 2, torch.float32, True, seed=7)
    caches = [_caches("planes", 1, torch.float32, 8)[0], _caches("packed", 1, torch.float32, 9)[0]]
    reference = [c.clone() for c in caches]
    _write("torch", monkeypatch, reference, staged, 0, rows, SPECS["neox"], True, True)
    monkeypatch.setenv(kv_load.KERNEL_ENV, "triton")
    with pytest.raises(RuntimeError, match="load kernel cannot take"):
        kv_load.write_layers(staged, 0, [flash_attn_view(c, HEADS, DIM) for c in caches], rows,
                             SPECS["neox"], True, True)
    with monkeypatch.context() as mp:
        mp.delenv("TRITON_INTERPRET")  # auto on CPU: the torch path, never the kernel
        _write("auto", mp, caches, staged, 0, rows, SPECS["neox"], True, True)
    for got, want in zip(caches, reference):
        assert torch.equal(got, want)


def test_bad_mode_is_refused(monkeypatch):
    staged, rows = _load(1, 1, torch.float32, True, seed=10)
    monkeypatch.setenv(kv_load.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=kv_load.KERNEL_ENV):
        kv_load.write_layers(staged, 0, [flash_attn_view(_caches("planes", 1, torch.float32, 0)[0], HEADS, DIM)],
                             rows, None, False, True)


def test_a_failing_kernel_falls_back_under_auto(monkeypatch, caplog):
    """auto: a kernel that raises (say, no compiler for this GPU) is given up once, the
    load is written by torch ops and equals the torch path; triton: the error surfaces."""
    from ucm.sparse.blend import load_triton

    staged, rows = _load(2, 2, torch.float32, True, seed=11)
    want = _caches("planes", 2, torch.float32, seed=12)
    got = [c.clone() for c in want]
    _write("torch", monkeypatch, want, staged, 0, rows, SPECS["neox"], True, True)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(load_triton, "scatter_blocks", broken)
    monkeypatch.setattr(kv_load.KERNEL, "_broken", None)
    monkeypatch.setattr(kv_load, "_kernel_for", lambda staged, views: load_triton)  # as on CUDA
    with pytest.raises(RuntimeError, match="no compiler"):
        _write("triton", monkeypatch, [c.clone() for c in want], staged, 0, rows, SPECS["neox"], True, True)
    _write("auto", monkeypatch, got, staged, 0, rows, SPECS["neox"], True, True)
    assert kv_load.KERNEL.broken and "load/save kernel failed" in caplog.text
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Saves take the torch path from then on too (the kernel is not tried again).
    monkeypatch.setattr(load_triton, "gather_blocks", broken)
    views = [flash_attn_view(c, HEADS, DIM) for c in want]
    saved = torch.zeros_like(staged)
    kv_load.read_layers(saved, views, rows, SPECS["neox"], True)
    monkeypatch.setenv(kv_load.KERNEL_ENV, "torch")
    reference = torch.zeros_like(staged)
    kv_load.read_layers(reference, views, rows, SPECS["neox"], True)
    assert torch.equal(saved, reference) and "no compiler" in kv_load.KERNEL.broken
    assert caplog.text.count("load/save kernel failed") == 1


def _save_rows(dtype: torch.dtype, seed: int):
    """The [4, R] rows of a save: two prefix blocks (delta 0) and the same two blocks again
    under chunk keys (a chunk at position 8 stored as if at 0, delta 8), one cache slot read
    twice -- what a cold RAG prompt saves -- plus empty output blocks."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(NUM_BLOCKS, generator=g)
    position = torch.cat([torch.arange(8, 8 + 2 * T)] * 2)
    slot = token_slots(table, position, BS)
    delta = torch.cat([torch.zeros(2 * T, dtype=torch.long), torch.full((2 * T,), 8)])
    rows = torch.stack([torch.arange(4 * T), slot, position, delta])
    return torch.zeros(4, 3, 2, T, HEADS, DIM, dtype=dtype), rows


@pytest.mark.parametrize("layout", ["packed", "planes"])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_kernel_equals_torch_path(monkeypatch, layout, rope, dtype):
    spec = SPECS[rope]
    caches = _caches(layout, 3, dtype, seed=11)
    before = [c.clone() for c in caches]
    views = [flash_attn_view(c, HEADS, DIM) for c in caches]
    out = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv(kv_load.KERNEL_ENV, mode)
        blocks, rows = _save_rows(dtype, seed=12)
        kv_load.read_layers(blocks, views, rows, spec, True)
        out[mode] = blocks
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(out["triton"], out["torch"], **tol)
    assert all(torch.equal(c, b) for c, b in zip(caches, before))  # a save only reads
    # Prefix rows (delta 0) are the cache's bytes exactly; V is never rotated.
    k, v = views[2].gather(_save_rows(dtype, seed=12)[1][1])
    assert torch.equal(out["triton"][:2, 2, 0].reshape(-1, HEADS, DIM), k[:2 * T])
    assert torch.equal(out["triton"][:, 2, 1].reshape(-1, HEADS, DIM), v)


def test_a_saved_key_stands_at_its_stored_position_and_loads_back(monkeypatch):
    """Saving a key cached at position p with delta d stores rotate(raw, p - d); loading
    that block at position q with delta q - (p - d) puts back rotate(raw, q)."""
    monkeypatch.setenv(kv_load.KERNEL_ENV, "triton")
    spec = SPECS["neox"]
    g = torch.Generator().manual_seed(13)
    raw = torch.randn(2 * T, HEADS, DIM, generator=g)
    position = 500 + torch.arange(2 * T)
    slot = token_slots(torch.tensor([3, 7, 1, 4]), position - 500, BS)
    cache = _caches("planes", 1, torch.float32, seed=14)[0]
    view = flash_attn_view(cache, HEADS, DIM)
    view.scatter(slot, rotate(raw, position, spec), raw)
    blocks = torch.zeros(2, 1, 2, T, HEADS, DIM)
    kv_load.read_layers(blocks, [view], torch.stack([torch.arange(2 * T), slot, position,
                                                     torch.full_like(position, 500)]), spec, True)
    stored = blocks[:, 0, 0].reshape(-1, HEADS, DIM)
    torch.testing.assert_close(stored, rotate(raw, position - 500, spec), rtol=1e-5, atol=1e-5)
    other = _caches("packed", 1, torch.float32, seed=15)[0]
    at = 2000 + torch.arange(2 * T)
    new_slot = token_slots(torch.tensor([9, 0, 5, 2]), at - 2000, BS)
    kv_load.write_layers(blocks, 0, [flash_attn_view(other, HEADS, DIM)],
                         torch.stack([torch.arange(2 * T), new_slot, at, at - (position - 500)]), spec, True, True)
    k, v = flash_attn_view(other, HEADS, DIM).gather(new_slot)
    torch.testing.assert_close(k, rotate(raw, at, spec), rtol=1e-4, atol=1e-4)
    assert torch.equal(v, raw)
