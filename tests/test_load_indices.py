"""WorkerSide._indices: the [4, R] rows (staged row, slot, position, delta) of a group of
loads, built with numpy, against a per-token Python reference; and owner_runs."""

from __future__ import annotations

import torch

from ucm.engine.kv_layout import owner_runs
from ucm.engine.step_meta import BlockLoad, RequestStep
from ucm.engine.worker_side import WorkerSide
from ucm.store.dram_store import UcmDramStore


def test_indices_match_a_per_token_reference():
    bt, vbs = 4, 8  # ucm block tokens, vLLM block size
    worker = WorkerSide(UcmDramStore(capacity_bytes=1 << 20), block_tokens=bt, tp_rank=0, rope=None,
                        first_check_layer=None, max_step_tokens=64)
    worker.vllm_block_size = vbs
    a = RequestStep("a", block_ids=[5, 2, 9], num_computed=0, num_scheduled=24, prompt_len=24)
    b = RequestStep("b", block_ids=[7, 0], num_computed=0, num_scheduled=16, prompt_len=16)
    loads = [  # (request, load): partial first/last blocks, two requests, deltas
        (a, BlockLoad(b"k1", token_start=0, lo=1, hi=4, rope_delta=0, chunk=False)),
        (a, BlockLoad(b"k2", token_start=8, lo=8, hi=12, rope_delta=8, chunk=True)),
        (a, BlockLoad(b"k3", token_start=12, lo=12, hi=14, rope_delta=8, chunk=True)),
        (b, BlockLoad(b"k4", token_start=4, lo=4, hi=8, rope_delta=-3, chunk=True)),
    ]
    want = []
    for k, (req, load) in enumerate(loads):
        for pos in range(load.lo, load.hi):
            slot = req.block_ids[pos // vbs] * vbs + pos % vbs
            want.append((k * bt + pos - load.token_start, slot, pos, load.rope_delta))
    got = worker._indices([(req, load, torch.empty(0)) for req, load in loads])
    assert got.dtype == torch.int64 and got.shape == (4, len(want))
    assert got.t().tolist() == [list(w) for w in want]


def test_owner_runs_groups_consecutive_items_of_one_owner():
    a, b = object(), object()
    assert owner_runs([a, a, b, b, b, a]) == [(0, 2), (2, 5), (5, 6)]
    assert owner_runs([]) == []
