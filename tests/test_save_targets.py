"""Where the CUDA save path puts blocks on the host (kv_saver.host_targets): into slots the
DRAM tier lends, in pieces of at most STAGE_BLOCKS blocks per run of consecutive slots,
or into staging buffers. Copying a device buffer piece by piece must leave every host
block equal to its device block; the copies themselves run on CUDA (gpu_check saves)."""

from __future__ import annotations

import pytest
import torch

from ucm.engine import kv_saver
from ucm.engine.kv_saver import STAGE_BLOCKS, host_targets
from ucm.store.base import StoreError
from ucm.store.dram_store import UcmDramStore

SHAPE = (2, 2, 4, 1, 8)  # [L, K/V, block_tokens, H, D]
NBYTES = 2 * 2 * 4 * 1 * 8 * 2  # bf16


def _copy(per_block: torch.Tensor, pieces: list) -> None:
    for dst, first in pieces:  # what KVSaver._copy_to_host issues, minus the stream
        dst.copy_(per_block[first:first + dst.shape[0]])


def test_lent_slots_get_one_piece_per_run_and_hold_the_blocks(monkeypatch):
    monkeypatch.setattr(kv_saver, "STAGE_BLOCKS", 4)
    store = UcmDramStore(capacity_bytes=16 * NBYTES)
    store.reserve(NBYTES)
    early = store.lend_blocks(2, SHAPE, torch.bfloat16)  # slots 0-1
    store.return_blocks(early[:1])
    del early  # slot 0 is free again, slot 1 stays lent: the next lend is not one run
    lent = store.lend_blocks(15, SHAPE, torch.bfloat16)
    per_block = torch.randn((15,) + SHAPE).to(torch.bfloat16)
    host, pieces = host_targets(15, SHAPE, torch.bfloat16, lent)
    # slots 2..15 are taken first (free list order), then the returned slot 0: runs of
    # 14 and 1, the run of 14 cut into pieces of at most 4.
    assert [(first, dst.shape[0]) for dst, first in pieces] == [(0, 4), (4, 4), (8, 4), (12, 2), (14, 1)]
    assert all(dst.shape[1:] == SHAPE for dst, _ in pieces)
    _copy(per_block, pieces)
    assert [h.data_ptr() for h in host] == [b.data_ptr() for b in lent]
    assert all(torch.equal(h, per_block[i]) for i, h in enumerate(host))
    keys = [bytes([i]) * 16 for i in range(15)]
    assert store.wait(store.dump(keys, host, "x")) == 15
    loaded = store.wait(store.load(keys, "x"))
    assert all(torch.equal(t, per_block[i]) for i, t in enumerate(loaded))


def test_without_lent_slots_blocks_go_to_full_size_staging_buffers(monkeypatch):
    sizes = []

    def fake_pinned(shape, dtype):
        sizes.append(tuple(shape))
        return torch.empty(tuple(shape), dtype=dtype)

    monkeypatch.setattr(kv_saver.pinned, "empty", fake_pinned)
    n = 2 * STAGE_BLOCKS + 3
    per_block = torch.randn((n,) + SHAPE)
    host, pieces = host_targets(n, SHAPE, torch.float32, None)
    assert sizes == [(STAGE_BLOCKS,) + SHAPE] * 3
    assert [(first, dst.shape[0]) for dst, first in pieces] == [(0, STAGE_BLOCKS), (STAGE_BLOCKS, STAGE_BLOCKS),
                                                                (2 * STAGE_BLOCKS, 3)]
    _copy(per_block, pieces)
    assert len(host) == n and all(torch.equal(h, per_block[i]) for i, h in enumerate(host))


def test_a_lend_of_the_wrong_count_is_refused():
    store = UcmDramStore(capacity_bytes=4 * NBYTES)
    store.reserve(NBYTES)
    with pytest.raises(ValueError, match="2 lent blocks for 3"):
        host_targets(3, SHAPE, torch.bfloat16, store.lend_blocks(2, SHAPE, torch.bfloat16))


class _FakeStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FakeEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def cuda_as_cpu(monkeypatch):
    """Run KVSaver's CUDA save path on CPU tensors: streams and events do nothing (a CPU
    copy is done when it returns), so the thread's lend / copy / dump logic is what runs."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


def _saver(store):
    saver = kv_saver.KVSaver(store, block_tokens=4, tp_rank=0, rope=None, max_step_tokens=64)
    saver.reserve(num_layers=2, num_kv_heads=1, head_dim=8, element_size=2)
    return saver


def test_the_save_thread_lands_blocks_in_lent_slots(cuda_as_cpu):
    store = UcmDramStore(capacity_bytes=8 * NBYTES)
    saver = _saver(store)
    per_block = torch.randn((5,) + SHAPE).to(torch.bfloat16)
    keys = [bytes([i]) * 16 for i in range(5)]
    assert store.wait(saver._dump_when_copied(keys, per_block)) == 5
    got = store.wait(store.load(keys, kv_saver.BLOCK_LAYOUT))
    arena = store._arena
    assert all(torch.equal(g, per_block[i]) for i, g in enumerate(got))
    assert all(arena.memory.data_ptr() <= g.data_ptr() < arena.memory.data_ptr() + arena.memory.numel() for g in got)
    assert store.stats()["arena_free_slots"] == 3


def test_a_failed_dump_gives_the_lent_slots_back(cuda_as_cpu):
    class RefusingStore(UcmDramStore):
        def dump(self, keys, tensors, layout):
            raise ValueError("bad layout")

    store = RefusingStore(capacity_bytes=4 * NBYTES)
    saver = _saver(store)
    task = saver._dump_when_copied([bytes([i]) * 16 for i in range(4)], torch.zeros((4,) + SHAPE, dtype=torch.bfloat16))
    with pytest.raises(StoreError, match="bad layout"):  # reap() logs StoreErrors, never raises
        store.wait(task)
    del task
    import gc

    gc.collect()  # the failed future's traceback held the lent tensors
    assert store.lend_blocks(4, SHAPE, torch.bfloat16) is not None  # every slot is free again


def test_cpu_saves_gather_into_lent_slots_and_copy_once_per_run(monkeypatch):
    """On CPU the save runs on the request's path: a dump block by block (a copy, a slot and
    an insert per block) cost a cold 4K-token prompt of a tiny model ~100 ms on the 2-core
    VM. The saver lends the DRAM tier's slots: one run of fresh slots is gathered into
    directly (no copy at all), several runs get one copy each; the dump adopts them, and
    what is stored equals the paged cache."""
    from ucm.engine.kv_layout import PagedKV
    from ucm.engine.kv_saver import KVSaver
    from ucm.engine.step_meta import BlockSave, RequestStep, StepPlan

    layers, blocks = 2, 6
    block = (layers, 2, 4, 1, 8)
    store = UcmDramStore(capacity_bytes=14 * 2 * 2 * 4 * 1 * 8 * 4)  # 14 slots
    saver = KVSaver(store, 4, 0, None, max_step_tokens=64)
    saver.reserve(layers, 1, 8, 4)  # [L, 2, 4, 1, 8] float32 blocks
    views = {f"l{i}": PagedKV(torch.randn(16, 4, 1, 8), torch.randn(16, 4, 1, 8)) for i in range(layers)}
    copies = []
    real_copy = torch.Tensor.copy_

    def counting_copy(self, src, *args, **kwargs):
        if tuple(self.shape[1:]) == block:  # a copy of whole stored blocks
            copies.append(self.shape[0])
        return real_copy(self, src, *args, **kwargs)

    def save(first_key: int) -> list[bytes]:
        step = RequestStep("r", list(range(blocks)), 0, blocks * 4, blocks * 4)
        step.saves = [BlockSave(bytes([first_key + i]) * 32, 4 * i, 0) for i in range(blocks)]
        plan = StepPlan()
        plan.requests["r"] = step
        monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
        saver.save(plan, views, list(views), 4)
        monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
        saver.reap(wait=True)
        return [s.key for s in step.saves]

    def stored_equal(keys: list[bytes]) -> bool:
        loaded = store.wait(store.load(keys, "ucm-kv-v1:L,KV,T,H,D"))
        return all(torch.equal(b[layer, 0], views[f"l{layer}"].k[i]) and torch.equal(b[layer, 1], views[f"l{layer}"].v[i])
                   for i, b in enumerate(loaded) for layer in range(layers))

    assert stored_equal(save(0)) and copies == []  # one run of fresh slots (0-5): gathered in place
    hole = store.lend_blocks(3, block, torch.float32)  # slots 6-8 lent ...
    store.return_blocks(hole[1:2])  # ... and slot 7 given back: the next lend is 9-13, then 7
    del hole
    assert stored_equal(save(100)) and copies == [5, 1]  # two runs: one copy each
