"""UcmDramStore: round trips, copy semantics, LRU under a byte budget, thread safety."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from ucm.store import StoreError, UcmDramStore

LAYOUT = "LKBHD"


def make_keys(n: int, salt: str = "") -> list:
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(30, 2, 16, 3, 64), (5,), ()])
def test_round_trip(dtype, shape):
    s = UcmDramStore(capacity_bytes=1 << 24)
    keys = make_keys(1)
    t = torch.randn(shape).to(dtype)
    assert s.lookup(keys) == [False]
    assert s.wait(s.dump(keys, [t], LAYOUT)) == 1
    assert s.lookup(keys) == [True]
    got = s.wait(s.load(keys, LAYOUT))[0]
    assert got.dtype == dtype and torch.equal(got, t)


def test_dump_stores_a_private_copy():
    s = UcmDramStore(capacity_bytes=1 << 20)
    key = make_keys(1)
    t = torch.zeros(8)
    s.wait(s.dump(key, [t], LAYOUT))
    t.fill_(7)  # the caller reuses its staging buffer
    assert torch.equal(s.wait(s.load(key, LAYOUT))[0], torch.zeros(8))


def test_load_shares_by_default_and_copies_on_request():
    shared = UcmDramStore(capacity_bytes=1 << 20)
    copying = UcmDramStore(capacity_bytes=1 << 20, copy_on_load=True)
    key = make_keys(1)
    for s in (shared, copying):
        s.wait(s.dump(key, [torch.ones(4)], LAYOUT))
    a, b = (shared.wait(shared.load(key, LAYOUT))[0] for _ in range(2))
    assert a.data_ptr() == b.data_ptr()  # zero-copy: the documented read-only contract
    c, d = (copying.wait(copying.load(key, LAYOUT))[0] for _ in range(2))
    assert c.data_ptr() != d.data_ptr()


def test_lru_eviction_order_and_budget():
    nbytes = 1024 * 4
    s = UcmDramStore(capacity_bytes=3 * nbytes)
    a, b, c, d = make_keys(4)
    for key in (a, b, c):
        s.wait(s.dump([key], [torch.zeros(1024)], LAYOUT))
    s.wait(s.load([a], LAYOUT))
    s.lookup([b])  # a lookup does not refresh recency
    s.wait(s.dump([d], [torch.zeros(1024)], LAYOUT))
    assert s.lookup([a, b, c, d]) == [True, False, True, True]
    st = s.stats()
    assert st["evictions"] == 1 and st["used_bytes"] == 3 * nbytes and st["num_blocks"] == 3


def test_existing_keys_and_oversized_blocks_are_skipped():
    s = UcmDramStore(capacity_bytes=64)
    keys = make_keys(2)
    assert s.wait(s.dump(keys[:1], [torch.zeros(4)], LAYOUT)) == 1
    assert s.wait(s.dump(keys[:1], [torch.ones(4)], LAYOUT)) == 0
    assert s.wait(s.dump(keys[1:], [torch.zeros(100)], LAYOUT)) == 0
    assert s.lookup(keys) == [True, False]
    assert s.stats()["blocks_skipped"] == 2


def test_wrong_layout_is_a_counted_miss_and_dropped():
    s = UcmDramStore(capacity_bytes=1 << 20)
    key = make_keys(1)
    s.wait(s.dump(key, [torch.ones(4)], LAYOUT))
    assert s.wait(s.load(key, "LBKHD")) == [None]
    st = s.stats()
    assert st["corrupt"] == 1 and st["rejected_layout"] == 1 and st["misses"] == 1
    assert s.lookup(key) == [False]


def test_concurrent_use_keeps_budget_consistent():
    nbytes = 256 * 4
    s = UcmDramStore(capacity_bytes=20 * nbytes)
    errors = []

    def worker(tid: int) -> None:
        try:
            keys = make_keys(50, salt=f"t{tid % 2}")  # pairs of threads share keys
            for i, key in enumerate(keys):
                s.wait(s.dump([key], [torch.full((256,), float(i))], LAYOUT))
                got = s.wait(s.load([key], LAYOUT))[0]
                assert got is None or torch.all(got == float(i))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = s.stats()
    assert st["used_bytes"] == st["num_blocks"] * nbytes <= 20 * nbytes


def test_closed_store_fails_tasks_and_bad_config_is_rejected():
    s = UcmDramStore(capacity_bytes=1024)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.wait(s.load(make_keys(1), LAYOUT))
    with pytest.raises(ValueError):
        UcmDramStore(capacity_bytes=0)


def test_reserve_pins_the_capacity_once_per_block_size(monkeypatch):
    """On CUDA hosts, reserve() pins capacity // block_nbytes blocks up front (once per
    size); inserts then take their memory from the same pinned path."""
    from ucm.store import dram_store
    from ucm.store import pinned as pinned_mod
    from ucm.store.pipeline_store import UcmPipelineStore

    pinned: list[tuple[tuple[int, ...], torch.dtype]] = []

    def fake_pinned(shape, dtype):
        pinned.append((tuple(shape), dtype))
        return torch.empty(tuple(shape), dtype=dtype)

    monkeypatch.setattr(pinned_mod, "empty", fake_pinned)
    monkeypatch.setattr(pinned_mod, "AVAILABLE", True)
    store = dram_store.UcmDramStore(capacity_bytes=10_000)
    UcmPipelineStore([store]).reserve(1024, in_flight_blocks=2)  # a pipeline forwards the hint
    assert pinned == [((1024,), torch.uint8)] * (9 + 2)
    store.reserve(1024)
    assert len(pinned) == 11  # the same size again: nothing more
    block = torch.arange(256, dtype=torch.float32)
    store.wait(store.dump([b"k" * 16], [block], "x"))
    assert pinned[-1] == ((256,), torch.float32)
    assert torch.equal(store.wait(store.load([b"k" * 16], "x"))[0], block)


def test_reserve_is_a_no_op_without_cuda(monkeypatch):
    from ucm.store import dram_store
    from ucm.store import pinned as pinned_mod

    monkeypatch.setattr(pinned_mod, "AVAILABLE", False)
    monkeypatch.setattr(pinned_mod, "empty", lambda *a: pytest.fail("pinned without CUDA"))
    dram_store.UcmDramStore(capacity_bytes=10_000).reserve(1024)


def test_reserve_survives_a_pinning_limit(monkeypatch, caplog):
    """Running out of lockable memory while reserving is a warning, not a failed engine."""
    from ucm.store import dram_store
    from ucm.store import pinned as pinned_mod

    calls = []

    def limited(shape, dtype):
        calls.append(shape)
        if len(calls) > 3:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return torch.empty(tuple(shape), dtype=dtype)

    monkeypatch.setattr(pinned_mod, "empty", limited)
    monkeypatch.setattr(pinned_mod, "AVAILABLE", True)
    store = dram_store.UcmDramStore(capacity_bytes=10_000)
    with caplog.at_level("WARNING"):
        store.reserve(1024)
    assert len(calls) == 4 and "pinned only 3 of 9 blocks" in caplog.text
