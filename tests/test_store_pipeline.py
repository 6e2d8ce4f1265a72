"""UcmPipelineStore: lookup across tiers, promotion on load, write-through on dump."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch

from ucm.store import StoreError, UcmDramStore, UcmNfsStore, UcmPipelineStore, nfs_store

LAYOUT = "LKBHD"


def make_keys(n: int, salt: str = "") -> list:
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


@pytest.fixture
def tiers(tmp_path):
    dram = UcmDramStore(capacity_bytes=1 << 20)
    nfs = UcmNfsStore(str(tmp_path / "kv"), io_threads=2)
    pipe = UcmPipelineStore([dram, nfs])
    yield pipe, dram, nfs
    pipe.close()


def test_dump_writes_through_to_every_tier(tiers):
    pipe, dram, nfs = tiers
    keys = make_keys(3)
    tensors = [torch.full((2, 8), float(i), dtype=torch.bfloat16) for i in range(3)]
    assert pipe.wait(pipe.dump(keys, tensors, LAYOUT)) == 3
    assert dram.lookup(keys) == [True] * 3 and nfs.lookup(keys) == [True] * 3
    assert pipe.wait(pipe.dump(keys, tensors, LAYOUT)) == 0


def test_lookup_is_true_if_any_tier_has_it(tiers):
    pipe, dram, nfs = tiers
    a, b, c = make_keys(3)
    dram.wait(dram.dump([a], [torch.ones(2)], LAYOUT))
    nfs.wait(nfs.dump([b], [torch.ones(2)], LAYOUT))
    assert pipe.lookup([a, b, c]) == [True, True, False]


def test_load_promotes_from_slow_tier_into_fast_tier(tiers):
    pipe, dram, nfs = tiers
    keys = make_keys(2)
    nfs.wait(nfs.dump(keys, [torch.ones(4), torch.zeros(4)], LAYOUT))
    assert dram.lookup(keys) == [False, False]
    out = pipe.wait(pipe.load(keys + make_keys(1, "missing"), LAYOUT))
    assert torch.equal(out[0], torch.ones(4)) and torch.equal(out[1], torch.zeros(4)) and out[2] is None
    assert dram.lookup(keys) == [True, True]
    st = pipe.stats()
    assert st["promotions"] == 2 and st["hits_tier1"] == 2 and st["hits"] == 2 and st["misses"] == 1
    # Second load is served by DRAM even if the file disappears.
    for key in keys:
        os.remove(nfs.path_for(key))
    assert pipe.wait(pipe.load(keys, LAYOUT))[0] is not None
    assert pipe.stats()["hits_tier0"] == 2


def test_corrupt_fast_tier_falls_back_to_slow_tier(tiers):
    pipe, dram, nfs = tiers
    key = make_keys(1)
    nfs.wait(nfs.dump(key, [torch.ones(4)], LAYOUT))
    dram.wait(dram.dump(key, [torch.ones(4)], "OTHER"))  # wrong layout in DRAM
    assert torch.equal(pipe.wait(pipe.load(key, LAYOUT))[0], torch.ones(4))


def test_failing_tier_fails_the_dump_but_others_are_written(tiers, monkeypatch):
    pipe, dram, nfs = tiers

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    monkeypatch.setattr(nfs_store.os, "replace", no_space)
    key = make_keys(1)
    with pytest.raises(StoreError, match="UcmNfsStore.*ENOSPC"):
        pipe.wait(pipe.dump(key, [torch.ones(4)], LAYOUT), timeout=10)
    assert dram.lookup(key) == [True] and nfs.lookup(key) == [False]


def test_closed_pipeline_fails_tasks():
    pipe = UcmPipelineStore([UcmDramStore(capacity_bytes=1024)])
    pipe.close()
    with pytest.raises(StoreError, match="closed"):
        pipe.wait(pipe.load(make_keys(1), LAYOUT))
    with pytest.raises(ValueError):
        UcmPipelineStore([])


def test_failing_tier_on_load_degrades_to_misses(tiers, monkeypatch):
    pipe, dram, nfs = tiers
    in_dram, in_nfs = make_keys(2)
    dram.wait(dram.dump([in_dram], [torch.ones(4)], LAYOUT))
    nfs.wait(nfs.dump([in_nfs], [torch.ones(4)], LAYOUT))

    def denied(p, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)

    monkeypatch.setattr(nfs_store, "open_block", denied)
    out = pipe.wait(pipe.load([in_dram, in_nfs], LAYOUT), timeout=10)
    assert out[0] is not None and out[1] is None
    assert pipe.stats()["tier_errors"] == 1
