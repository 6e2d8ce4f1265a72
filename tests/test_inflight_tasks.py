"""In-flight saves tracked by the store's own Task: a lookup waits until a file store's
threads have written the blocks (what makes precompute_chunks' promise hold on CPU)."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import threading
import time

import torch

from ucm.engine.inflight import InflightSaves
from ucm.store import Task, UcmNfsStore
from ucm.store import nfs_store

LAYOUT = "L"


def test_task_done_callback_runs_once_after_every_part():
    parts = [cf.Future(), cf.Future()]
    task = Task(parts, sum, "two parts")
    seen = []
    task.add_done_callback(seen.append)
    parts[0].set_result(1)
    assert seen == []
    parts[1].set_result(2)
    assert seen == [task]
    done = []
    Task.completed(0, "done").add_done_callback(done.append)  # already done: at once
    Task([], sum, "nothing to write").add_done_callback(done.append)  # no parts: at once
    assert len(done) == 2


def test_lookup_waits_for_a_file_store_dump_task(tmp_path, monkeypatch):
    real = nfs_store.write_block
    release = threading.Event()

    def held(*args):
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(nfs_store, "write_block", held)
    inflight = InflightSaves()
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    with UcmNfsStore(str(tmp_path / "kv"), io_threads=2) as store:
        task = store.dump(keys, [torch.full((4,), float(i)) for i in range(3)], LAYOUT)
        inflight.add(keys, task)
        assert len(inflight) == 3 and store.lookup(keys) == [False] * 3  # still being written
        threading.Timer(0.3, release.set).start()
        t0 = time.perf_counter()
        inflight.wait(keys[1:2])
        assert time.perf_counter() - t0 >= 0.25
        assert store.lookup(keys) == [True] * 3
        assert store.wait(task) == 3
    assert len(inflight) == 0


def test_a_failed_dump_task_does_not_fail_the_lookup(tmp_path):
    inflight = InflightSaves()
    task = Task.failed(OSError("disk gone"), "dump")
    inflight.add([b"k"], task)
    inflight.wait([b"k"])  # returns; the saver reports the failure
    assert len(inflight) == 0
