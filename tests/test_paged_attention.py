"""The paged exact-mask attention kernel against the reference on a gathered context,
run on CPU by Triton's interpreter (on the GPU host: benchmarks/attention_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ucm.engine.kv_layout import flash_attn_view
from ucm.sparse.blend import attention, paged_backend
from ucm.sparse.blend.attention import causal_attention_by_position
from ucm.sparse.blend.paged_attention import (LARGE_TILES, SMALL_TILES, PagedBatch, launch_tiles, paged_attention,
                                              paged_attention_batch, program_table, supports, tiles_for)

BS, NUM_BLOCKS = 8, 12


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _case(heads: int, kv_heads: int, dim: int, seq_len: int, rows: int, layout: str, seed: int,
          sort: bool = True):
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":  # vLLM 0.26 FLASH_ATTN: [blocks, heads, block_size, 2 * head_dim]
        cache = torch.randn(NUM_BLOCKS, kv_heads, BS, 2 * dim, generator=g)
    else:  # vLLM 0.32: [2, blocks, block_size, heads, head_dim]
        cache = torch.randn(2, NUM_BLOCKS, BS, kv_heads, dim, generator=g)
    view = flash_attn_view(cache, kv_heads, dim)
    table = torch.randperm(NUM_BLOCKS, generator=g)[: (seq_len + BS - 1) // BS]
    positions = torch.randperm(seq_len, generator=g)[:rows]
    positions[0] = seq_len - 1  # the last token is always among Blend's rows
    if sort:
        positions = positions.sort().values
    q = torch.randn(rows, heads, dim, generator=g)
    return q, positions, view, table


def _reference(q, positions, view, table, seq_len, scale):
    keys = torch.arange(seq_len)
    slots = table[keys // BS] * BS + keys % BS
    k, v = view.gather(slots)
    return causal_attention_by_position(q, positions, k, v, keys, scale, backend="sdpa")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("layout", ["packed", "planes"])
def test_equals_reference(heads, kv_heads, layout):
    seq_len, dim = 83, 16
    q, positions, view, table = _case(heads, kv_heads, dim, seq_len, 21, layout, seed=heads * 10 + kv_heads)
    got = paged_attention(q, positions, view.k, view.v, table, seq_len, 0.25, block_q=16, block_n=16)
    want = _reference(q, positions, view, table, seq_len, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsorted_rows_odd_head_dim_and_one_program():
    seq_len = 40
    q, positions, view, table = _case(4, 2, 24, seq_len, 9, "planes", seed=3, sort=False)
    got = paged_attention(q, positions, view.k, view.v, table, seq_len, 0.2)  # default tiles
    torch.testing.assert_close(got, _reference(q, positions, view, table, seq_len, 0.2), rtol=1e-5, atol=1e-5)


def test_keys_after_a_row_are_invisible():
    """Changing K/V after a row's position must not change that row's output."""
    seq_len = 48
    q, positions, view, table = _case(4, 2, 16, seq_len, 6, "planes", seed=4)
    positions = torch.tensor([3, 9, 17, 30, 31, 47])
    before = paged_attention(q, positions, view.k, view.v, table, seq_len, 0.3, block_q=16, block_n=16)
    late = torch.arange(32, seq_len)
    slots = table[late // BS] * BS + late % BS
    view.scatter(slots, torch.randn(len(late), 2, 16), torch.randn(len(late), 2, 16))
    after = paged_attention(q, positions, view.k, view.v, table, seq_len, 0.3, block_q=16, block_n=16)
    assert torch.equal(before[:5], after[:5])
    assert not torch.allclose(before[5], after[5])


def test_refuses_what_it_cannot_take():
    q, positions, view, table = _case(4, 2, 16, 20, 3, "planes", seed=5)
    assert supports(q, view.k, view.v)
    assert not supports(q.to(torch.float64), view.k, view.v)
    assert not supports(q[..., :8], view.k[..., :8], view.v[..., :8])  # head_dim below 16
    with pytest.raises(ValueError, match="paged_attention cannot take"):
        paged_attention(q.half(), positions, view.k, view.v, table, 20, 0.1)


@pytest.fixture
def fresh_backends(monkeypatch):
    """Backend verdicts are per process; give each test its own."""
    monkeypatch.setattr(attention, "_BROKEN", {})
    monkeypatch.setattr(attention.KERNEL, "_broken", None)
    monkeypatch.setattr(attention, "_VERIFIED", set())
    monkeypatch.setattr(attention, "_WARNED", set())


def _gathered(view, table, seq_len):
    keys = torch.arange(seq_len)
    k, v = view.gather(table[keys // BS] * BS + keys % BS)
    return lambda: (k, v, keys)


def test_run_paged_checks_its_first_call(monkeypatch, fresh_backends):
    monkeypatch.setenv(attention.ENV_VAR, "triton")
    assert paged_backend.paged_kernel_wanted(torch.device("cpu"))
    q, positions, view, table = _case(8, 2, 16, 50, 7, "planes", seed=6)
    out = paged_backend.run_paged(q, positions, view.k, view.v, table, 50, 0.25, _gathered(view, table, 50))
    torch.testing.assert_close(out, _reference(q, positions, view, table, 50, 0.25), rtol=1e-5, atol=1e-5)
    assert attention.PAGED in attention._VERIFIED


def test_a_wrong_kernel_is_given_up_not_used(monkeypatch, fresh_backends, caplog):
    from ucm.sparse.blend import paged_attention as module

    monkeypatch.setenv(attention.ENV_VAR, "triton")
    real = module.paged_attention_batch
    monkeypatch.setattr(module, "paged_attention_batch", lambda *a, **kw: real(*a, **kw) * 1.5)
    q, positions, view, table = _case(4, 2, 16, 30, 5, "planes", seed=7)
    assert paged_backend.run_paged(q, positions, view.k, view.v, table, 30, 0.25, _gathered(view, table, 30)) is None
    assert "differs from the reference" in attention.KERNEL.broken
    assert not paged_backend.paged_kernel_wanted(torch.device("cpu"))  # given up for the process
    assert "paged Triton attention kernel failed" in caplog.text


def test_auto_on_cpu_gathers(monkeypatch, fresh_backends):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    assert not paged_backend.paged_kernel_wanted(torch.device("cpu"))


def test_one_launch_serves_requests_with_their_own_keys():
    """Three requests in one shared cache (one with no rows): each row equals the
    reference over its own request's keys, whatever order the programs run in."""
    g = torch.Generator().manual_seed(11)
    cache = torch.randn(2, NUM_BLOCKS, BS, 2, 16, generator=g)
    view = flash_attn_view(cache, 2, 16)
    blocks = torch.randperm(NUM_BLOCKS, generator=g)
    reqs = [(blocks[:5], 37, 11), (blocks[5:6], 8, 0), (blocks[6:12], 45, 23)]  # (table, seq_len, rows)
    tables = torch.zeros(3, 6, dtype=torch.int32)
    qs, positions = [], []
    for r, (table, seq_len, rows) in enumerate(reqs):
        tables[r, :len(table)] = table
        positions.append(torch.randperm(seq_len, generator=g)[:rows].sort().values)
        qs.append(torch.randn(rows, 8, 16, generator=g))
    q, pos = torch.cat(qs), torch.cat(positions)
    for heaviest_first in (True, False):
        batch = PagedBatch.build(tables, [r[1] for r in reqs], [r[2] for r in reqs], group=4, block_q=16,
                                 heaviest_first=heaviest_first)
        got = paged_attention_batch(q, pos, view.k, view.v, batch, 0.25, block_n=16)
        start = 0
        for (table, seq_len, rows), q_r, pos_r in zip(reqs, qs, positions):
            want = _reference(q_r, pos_r, view, table, seq_len, 0.25)
            torch.testing.assert_close(got[start:start + rows], want, rtol=1e-5, atol=1e-5)
            start += rows
    with pytest.raises(ValueError, match="rows of q for a batch of"):
        paged_attention_batch(q[:-1], pos[:-1], view.k, view.v, batch, 0.25)


def test_program_table_covers_every_row_once_heaviest_first():
    counts, seq_lens, block_m = [10, 0, 7, 3], [4000, 50, 9000, 120], 4
    table = program_table(counts, seq_lens, block_m)
    assert table.dtype == np.int32 and table.shape[1] == 3
    covered = sorted(row for _, first, rows in table for row in range(first, first + rows))
    assert covered == list(range(sum(counts)))
    assert (table[:, 2] >= 1).all() and (table[:, 2] <= block_m).all()
    starts = np.cumsum([0] + counts)
    for req, first, rows in table:  # a program stays inside its request's stretch
        assert starts[req] <= first and first + rows <= starts[req + 1]
    est = [seq_lens[r] * (f + n - starts[r]) / counts[r] for r, f, n in table]
    assert est == sorted(est, reverse=True) and table[0].tolist() == [2, 14, 3]  # c's last rows first
    # A request continuing a chunked prefill: its rows start at position 8800, so its
    # programs walk more keys than a fresh request's of the same length would.
    later = program_table([4, 4], [9000, 9100], 2, first_rows=[8800, 0])
    assert later[:, 1].tolist() == [6, 2, 0, 4]  # request 0's first rows (near 8900) before request 1's (near 4550)
    assert program_table([4, 4], [9000, 9100], 2)[:, 1].tolist() == [6, 2, 4, 0]  # as if both started at 0
    in_order = program_table(counts, seq_lens, block_m, heaviest_first=False)
    assert in_order[:, 1].tolist() == sorted(in_order[:, 1].tolist())


def test_large_tiles_only_on_a_gpu_with_room_for_them():
    hopper, ampere = 228 * 1024, 164 * 1024
    assert tiles_for(True, 2, 128, hopper) == LARGE_TILES
    assert tiles_for(True, 2, 128, ampere) == SMALL_TILES
    assert tiles_for(True, 4, 128, hopper) == SMALL_TILES  # float32 tiles are twice as large
    assert tiles_for(True, 2, 256, hopper) == SMALL_TILES
    assert tiles_for(False, 2, 128, hopper) == SMALL_TILES
    assert launch_tiles(torch.zeros(4, 8, 128, dtype=torch.bfloat16)) == SMALL_TILES  # CPU: the interpreter


def test_a_large_tile_launch_that_fails_is_retried_with_small_tiles(monkeypatch, caplog):
    from ucm.sparse.blend import paged_attention as module

    real_jit = module._jit

    class Refusing:
        def __init__(self, grid):
            self.grid = grid

        def __call__(self, *args, **kwargs):
            if kwargs["BLOCK_N"] == LARGE_TILES[0]:
                raise RuntimeError("out of resource: shared memory")
            return real_jit(True)[self.grid](*args, **kwargs)

    monkeypatch.setattr(module, "_jit", lambda interpret: type("J", (), {"__getitem__": lambda self, g: Refusing(g)})())
    monkeypatch.setattr(module, "launch_tiles", lambda q: LARGE_TILES)
    monkeypatch.setattr(module, "_LARGE_TILES_FAILED", set())
    seq_len = 40
    q, positions, view, table = _case(4, 2, 16, seq_len, 9, "planes", seed=12)
    got = paged_attention(q, positions, view.k, view.v, table, seq_len, 0.2)
    torch.testing.assert_close(got, _reference(q, positions, view, table, seq_len, 0.2), rtol=1e-5, atol=1e-5)
    assert module._LARGE_TILES_FAILED == {q.device} and "failed on cpu" in caplog.text
    with pytest.raises(RuntimeError, match="out of resource"):  # asked for explicitly: no silent retry
        paged_attention(q, positions, view.k, view.v, table, seq_len, 0.2, block_n=128, num_stages=3)
