"""UcmNfsStore shared by several (spawned) processes: cross-process reads, racing writers."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import torch

from ucm.store import UcmNfsStore

LAYOUT = "LKBHD"
NUM_KEYS = 12
SHAPE = (4, 2, 16, 4, 64)  # 256 KiB in fp32: big enough for writes to overlap
PARENT_KEY = hashlib.sha256(b"parent").digest()
PARENT_BLOCK = torch.arange(12, dtype=torch.bfloat16)


def shared_keys() -> list:
    return [hashlib.sha256(f"shared{i}".encode()).digest() for i in range(NUM_KEYS)]


def _writer(root: str, value: float, barrier) -> None:
    """Child process: read the parent's block, then race the other child on every key."""
    try:
        store = UcmNfsStore(root, io_threads=2)
        parent_block = store.wait(store.load([PARENT_KEY], LAYOUT))[0]
        assert parent_block is not None and torch.equal(parent_block, PARENT_BLOCK)
        for round_ in range(3):
            for key in shared_keys():
                # Bypass the exists-check so both processes really write and rename
                # the same final name: atomic replacement is what is under test.
                store._write_block(key, torch.full(SHAPE, value), LAYOUT)
            if round_ == 0:
                barrier.wait(timeout=120)  # all files exist; now race on while the parent reads
        store.close()
    except BaseException:
        barrier.abort()  # fail the parent's wait at once instead of after its timeout
        raise


def _check_uniform(tensor: torch.Tensor) -> None:
    assert tensor.shape == SHAPE
    first = tensor.reshape(-1)[0].item()
    assert first in (1.0, 2.0), first
    assert torch.all(tensor == first), "block mixes bytes of two writers"


def test_two_processes_racing_on_same_keys_leave_valid_files(tmp_path):
    """Spawned processes share the dir: they read our block, we read theirs, mid-race too."""
    root = str(tmp_path / "kv")
    reader = UcmNfsStore(root)
    reader.wait(reader.dump([PARENT_KEY], [PARENT_BLOCK], LAYOUT))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)  # the parent joins too, so it reads only while both write
    procs = [ctx.Process(target=_writer, args=(root, v, barrier)) for v in (1.0, 2.0)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    # Read while they write: every result must be a miss or a whole block.
    while any(p.is_alive() for p in procs):
        for tensor in reader.wait(reader.load(shared_keys(), LAYOUT), timeout=60):
            if tensor is not None:
                _check_uniform(tensor)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert reader.stats()["corrupt"] == 0
    for tensor in reader.wait(reader.load(shared_keys(), LAYOUT), timeout=60):
        _check_uniform(tensor)
    names = [n for _d, _s, files in os.walk(root) for n in files]
    assert len(names) == NUM_KEYS + 1 and not any(n.endswith(".tmp") for n in names)
    reader.close()
