"""Host->device staging helpers: strided row copies and the worker's per-run staging.

On this CPU-only machine the pitched CUDA copy is not available, so these check the
row-by-row path and the run bookkeeping; the pitched copy itself is checked on the
GPU host (benchmarks/gpu_check.py, ``PASS_loads``).
"""

from __future__ import annotations

import torch

from ucm.sparse.blend.transfer import copy_rows_to_device, stage_runs
from ucm.store.arena import coalesce_runs


def _blocks(n: int, layers: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``n`` blocks ``[layers, 2, 4, 2, 8]`` back to back in one buffer, as an arena holds them."""
    arena = torch.arange(n * layers * 2 * 4 * 2 * 8, dtype=torch.float32).reshape(n, layers, 2, 4, 2, 8)
    return arena, [arena[i] for i in range(n)]


def test_copy_rows_copies_a_range_of_layers():
    arena, _ = _blocks(6)
    src = arena[:, 1:3]  # rows equally spaced, each contiguous
    dst = torch.empty(src.shape)
    copy_rows_to_device(dst, src)
    assert torch.equal(dst, src)


def test_stage_layer_ranges_of_runs():
    arena, blocks = _blocks(6)
    other = torch.randn(5, 2, 4, 2, 8)  # a block from elsewhere breaks the run
    parts = blocks[:3] + [other] + blocks[4:]
    runs = coalesce_runs(parts)
    assert [(first, count) for first, count, _ in runs] == [(0, 3), (3, 1), (4, 2)]
    for s0, s1 in ((0, 5), (1, 2), (2, 5)):
        staged = stage_runs(runs, len(parts), s0, s1, torch.device("cpu"))
        want = torch.stack([p[s0:s1] for p in parts])
        assert torch.equal(staged, want)

