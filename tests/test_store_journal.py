"""Private tiers report what they hold to a scheduler in another process (no engine)."""

from __future__ import annotations

import torch

from ucm.store.dram_store import UcmDramStore
from ucm.store.journal import HeldKeys, KeyJournal
from ucm.store.nfs_store import UcmNfsStore
from ucm.store.pipeline_store import UcmPipelineStore


def _block(value: float) -> torch.Tensor:
    return torch.full((4, 8), value, dtype=torch.float32)  # 128 bytes


def test_journal_reports_latest_state_per_key_and_drains():
    j = KeyJournal()
    j.added([b"a", b"b"])
    j.dropped([b"a", b"c"])
    j.added([b"c"])
    assert j.drain() == ([b"b", b"c"], [b"a"])
    assert j.drain() == ([], [])


def test_dram_store_journals_saves_and_evictions():
    store = UcmDramStore(capacity_bytes=2 * 128)
    store.dump([b"old"], [_block(0)], "x").result()
    j = KeyJournal()
    assert store.attach_journal(j)
    assert j.drain() == ([b"old"], [])  # what it held before counts as added
    store.dump([b"k1", b"k2"], [_block(1), _block(2)], "x").result()  # evicts b"old" (2-block budget)
    added, dropped = j.drain()
    assert added == [b"k1", b"k2"] and dropped == [b"old"]
    held = HeldKeys()
    held.update([b"old"], [])
    held.update(added, dropped)
    assert b"k1" in held and b"k2" in held and b"old" not in held and len(held) == 2


def test_file_tier_needs_no_journal_and_pipeline_journals_its_private_tier(tmp_path):
    files = UcmNfsStore(str(tmp_path))
    assert not files.attach_journal(KeyJournal())
    pipe = UcmPipelineStore([UcmDramStore(capacity_bytes=1 << 16), UcmNfsStore(str(tmp_path / "p"))])
    j = KeyJournal()
    assert pipe.attach_journal(j)
    pipe.dump([b"k"], [_block(3)], "x").result()
    assert j.drain()[0] == [b"k"]
    pipe.close()
    files.close()
