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


def test_reserve_pins_one_arena_and_staging_only_for_other_sizes(monkeypatch):
    """On CUDA hosts, reserve() pins the capacity as one arena of block slots (once per
    store); blocks of that size then live in the arena, and the saver copies into lent
    slots, so no staging blocks are pinned for them. Staging is pinned for a block size
    the arena does not hold."""
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
    assert pinned == [((9 * 1024,), torch.uint8)]
    store.reserve(1024)
    assert len(pinned) == 1  # the same size again: nothing more
    block = torch.arange(256, dtype=torch.float32)  # 1024 bytes: an arena block
    store.wait(store.dump([b"k" * 16], [block], "x"))
    assert len(pinned) == 1 and store.stats()["arena_free_slots"] == 8
    store.reserve(2048, in_flight_blocks=5, stage_blocks=2)  # staging in buffers of 2 blocks
    assert pinned[1:] == [((2 * 2048,), torch.uint8)] * 3
    assert torch.equal(store.wait(store.load([b"k" * 16], "x"))[0], block)
    other = torch.arange(10, dtype=torch.float32)  # another size: its own pinned tensor
    store.wait(store.dump([b"o" * 16], [other], "x"))
    assert pinned[-1] == ((10,), torch.float32)
    assert torch.equal(store.wait(store.load([b"o" * 16], "x"))[0], other)


def test_reserve_without_cuda_builds_an_unpinned_arena(monkeypatch):
    from ucm.store import dram_store
    from ucm.store import pinned as pinned_mod

    monkeypatch.setattr(pinned_mod, "AVAILABLE", False)
    monkeypatch.setattr(pinned_mod, "empty", lambda *a: pytest.fail("pinned without CUDA"))
    store = dram_store.UcmDramStore(capacity_bytes=10_000)
    store.reserve(1024, in_flight_blocks=4)
    assert store.stats()["arena_slots"] == 9


def test_reserve_survives_a_pinning_limit(monkeypatch, caplog):
    """No lockable memory for the arena: blocks are pinned one by one, as far as the limit
    allows, with a warning, and the store still works."""
    from ucm.store import dram_store
    from ucm.store import pinned as pinned_mod

    calls = []

    def limited(shape, dtype):
        calls.append(tuple(shape))
        if shape[0] > 1024 or len(calls) > 4:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return torch.empty(tuple(shape), dtype=dtype)

    monkeypatch.setattr(pinned_mod, "empty", limited)
    monkeypatch.setattr(pinned_mod, "AVAILABLE", True)
    store = dram_store.UcmDramStore(capacity_bytes=10_000)
    with caplog.at_level("WARNING"):
        store.reserve(1024)
    assert calls[0] == (9 * 1024,) and len(calls) == 5
    assert "no arena" in caplog.text and "pinned only 3 of 9 blocks" in caplog.text
    assert "arena_slots" not in store.stats()


def _arena_store(slots: int = 4):
    store = UcmDramStore(capacity_bytes=slots * 1024)
    store.reserve(1024)
    return store


def _block(value: float) -> torch.Tensor:
    return torch.full((256,), value, dtype=torch.float32)


def test_blocks_saved_together_are_back_to_back_and_load_as_one_run():
    from ucm.store.arena import coalesce_runs

    store = _arena_store(8)
    keys = make_keys(5)
    store.wait(store.dump(keys, [_block(i) for i in range(5)], LAYOUT))
    loaded = store.wait(store.load(keys, LAYOUT))
    runs = coalesce_runs(loaded)
    assert [(first, count) for first, count, _ in runs] == [(0, 5)]
    assert torch.equal(runs[0][2], torch.stack(loaded))
    # Out of order or with a gap: one run per back-to-back stretch.
    runs = coalesce_runs([loaded[0], loaded[1], loaded[3], loaded[2]])
    assert [(first, count) for first, count, _ in runs] == [(0, 2), (2, 1), (3, 1)]


def test_an_evicted_block_still_held_by_a_reader_is_not_overwritten():
    """A loader may still be copying from a block when it is evicted: its slot is parked
    until the loader lets go, and only then reused."""
    store = _arena_store(2)
    a, b, c, d = make_keys(4)
    store.wait(store.dump([a, b], [_block(1), _block(2)], LAYOUT))
    held = store.wait(store.load([a], LAYOUT))[0]  # a is now most recently used
    store.wait(store.dump([c], [_block(3)], LAYOUT))  # evicts b (slot free)
    store.wait(store.dump([d], [_block(4)], LAYOUT))  # evicts a, whose slot is held
    assert store.lookup([a, b, c, d]) == [False, False, True, True]
    assert torch.equal(held, _block(1))  # not overwritten by c or d
    assert torch.equal(store.wait(store.load([c, d], LAYOUT))[0], _block(3))
    assert store.stats()["arena_free_slots"] == 0
    del held
    e = make_keys(5)[4]
    store.wait(store.dump([e], [_block(5)], LAYOUT))  # a's slot is reusable now
    assert torch.equal(store.wait(store.load([e], LAYOUT))[0], _block(5))
    assert store.stats()["num_blocks"] == 2


def test_every_slot_held_puts_a_new_block_in_its_own_tensor():
    store = _arena_store(1)
    a, b = make_keys(2)
    store.wait(store.dump([a], [_block(1)], LAYOUT))
    held = store.wait(store.load([a], LAYOUT))[0]
    store.wait(store.dump([b], [_block(2)], LAYOUT))  # evicts a; its slot is still held
    assert torch.equal(held, _block(1))
    assert torch.equal(store.wait(store.load([b], LAYOUT))[0], _block(2))


def test_lent_blocks_are_adopted_by_dump_without_a_copy():
    """The saver writes into lent arena slots; dump keeps those very bytes (a load returns
    a tensor over the lent memory), consecutive lends are back to back, and the slots
    count as used."""
    from ucm.store.arena import coalesce_runs

    store = _arena_store(8)
    lent = store.lend_blocks(3, (256,), torch.float32)
    assert lent is not None and [b.shape for b in lent] == [(256,)] * 3
    assert store.stats()["arena_free_slots"] == 5
    blocks = lent
    for i, b in enumerate(blocks):
        b.fill_(i + 1.0)
    keys = make_keys(3)
    assert store.wait(store.dump(keys, blocks, LAYOUT)) == 3
    loaded = store.wait(store.load(keys, LAYOUT))
    assert [t.data_ptr() for t in loaded] == [b.data_ptr() for b in lent]
    assert all(torch.equal(t, _block(i + 1.0)) for i, t in enumerate(loaded))
    assert [(f, c) for f, c, _ in coalesce_runs(loaded)] == [(0, 3)]
    st = store.stats()
    assert st["num_blocks"] == 3 and st["used_bytes"] == 3 * 1024 and st["arena_free_slots"] == 5


def test_lent_blocks_dumped_under_present_keys_or_returned_free_their_slots():
    store = _arena_store(4)
    key = make_keys(1)
    store.wait(store.dump(key, [_block(7)], LAYOUT))
    lent = store.lend_blocks(2, (256,), torch.float32)
    assert store.stats()["arena_free_slots"] == 1
    dup = lent[0].fill_(9.0)
    assert store.wait(store.dump(key, [dup], LAYOUT)) == 0  # present: skipped, slot given back
    assert torch.equal(store.wait(store.load(key, LAYOUT))[0], _block(7))
    store.return_blocks(lent[1:])
    del lent, dup  # the slots are reused once the caller lets go of its tensors
    assert len(store.lend_blocks(3, (256,), torch.float32)) == 3
    assert store.stats()["num_blocks"] == 1


def test_lending_evicts_lru_blocks_and_refuses_what_it_cannot_give():
    store = _arena_store(4)
    keys = make_keys(4)
    store.wait(store.dump(keys, [_block(i) for i in range(4)], LAYOUT))
    held = store.wait(store.load(keys[3:], LAYOUT))[0]  # a reader holds the newest block
    lent = store.lend_blocks(3, (256,), torch.float32)  # evicts the three oldest
    assert lent is not None and store.lookup(keys) == [False, False, False, True]
    assert store.stats()["evictions"] == 3
    assert store.lend_blocks(1, (256,), torch.float32) is None  # the last slot's block is held by a reader...
    assert store.lookup(keys[3:]) == [False]  # ...evicted for room, but its slot stays parked
    assert torch.equal(held, _block(3))
    assert store.lend_blocks(1, (512,), torch.float32) is None  # another size: no arena slots
    assert store.lend_blocks(5, (256,), torch.float32) is None  # more than the arena holds
    assert UcmDramStore(capacity_bytes=4096).lend_blocks(1, (256,), torch.float32) is None  # no arena (no reserve)


def test_a_pipeline_lends_its_fastest_tier_and_writes_lent_blocks_through(tmp_path):
    from ucm.store.nfs_store import UcmNfsStore
    from ucm.store.pipeline_store import UcmPipelineStore

    dram = _arena_store(4)
    files = UcmNfsStore(storage_backends=str(tmp_path))
    pipe = UcmPipelineStore([dram, files])
    lent = pipe.lend_blocks(2, (256,), torch.float32)
    assert lent is not None and dram.stats()["arena_free_slots"] == 2
    blocks = [b.fill_(i + 3.0) for i, b in enumerate(lent)]
    keys = make_keys(2)
    assert pipe.wait(pipe.dump(keys, blocks, LAYOUT)) == 2
    for tier in (dram, files):
        got = tier.wait(tier.load(keys, LAYOUT))
        assert all(torch.equal(g, _block(i + 3.0)) for i, g in enumerate(got))
    pipe.close()


def test_an_adopted_block_evicted_while_its_lender_still_holds_it_is_not_overwritten():
    """A lent block outlives its eviction in the hands of whoever still has it (the saver,
    or a slower tier writing it to disk): its slot stays parked until they let go."""
    store = _arena_store(2)
    lent = store.lend_blocks(2, (256,), torch.float32)
    for i, block in enumerate(lent):
        block.fill_(i + 1.0)
    a, b, c, d = make_keys(4)
    store.wait(store.dump([a, b], lent, LAYOUT))
    held = lent[0]  # e.g. the file tier still writing block a
    del lent
    store.wait(store.dump([c, d], [_block(3), _block(4)], LAYOUT))  # evicts a and b
    assert store.lookup([a, b, c, d]) == [False, False, True, True]
    assert torch.equal(held, _block(1))  # a's slot was not reused under it
    assert torch.equal(store.wait(store.load([c, d], LAYOUT))[1], _block(4))
    assert store.stats()["arena_free_slots"] == 0
