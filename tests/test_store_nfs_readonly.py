"""UcmNfsStore on odd roots: a read-only share, and things that are not block files.

A read-only root (a published, precomputed corpus) must serve lookups and loads with
saves off. A FIFO, directory or other non-regular file at a block's path must read as
"absent" at once: opening a FIFO for reading blocks until a writer comes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading

import pytest
import torch

from ucm.store import StoreError, UcmNfsStore
from ucm.store import block_files

LAYOUT = "LKBHD"


def make_keys(n: int, salt: str = "") -> list:
    return [hashlib.sha256(f"{salt}{i}".encode()).digest() for i in range(n)]


def block(seed: int) -> torch.Tensor:
    return torch.randn((2, 2, 4, 2, 8), generator=torch.Generator().manual_seed(seed))


def files_under(root: str) -> list:
    return sorted(os.path.join(d, n) for d, _dirs, names in os.walk(root) for n in names)


def _refuse_creates(real_open, err: int = errno.EROFS):
    """os.open as on a read-only mount: opening for reading works, creating does not."""

    def fake(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(err, os.strerror(err), path)
        return real_open(path, flags, *args, **kwargs)

    return fake


# ---- read-only roots -------------------------------------------------------------------------
@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_root_is_writable_is_false_when_a_probe_file_cannot_be_made(tmp_path, monkeypatch, err):
    assert block_files.root_is_writable(str(tmp_path)) is True
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind
    monkeypatch.setattr(block_files.os, "open", _refuse_creates(os.open, err))
    assert block_files.root_is_writable(str(tmp_path)) is False


def test_root_is_writable_raises_other_errors(tmp_path):
    with pytest.raises(OSError) as info:
        block_files.root_is_writable(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT


def test_read_only_root_loads_and_skips_saves_with_one_warning(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "kv")
    keys, tensors = make_keys(3), [block(i) for i in range(3)]
    with UcmNfsStore(root, io_threads=2) as writer:  # the corpus, published earlier
        assert writer.wait(writer.dump(keys, tensors, LAYOUT)) == 3
    before = files_under(root)

    monkeypatch.setattr(block_files.os, "open", _refuse_creates(os.open))
    with caplog.at_level(logging.WARNING, logger="ucm.store.nfs_store"):
        store = UcmNfsStore(root, io_threads=2, capacity_bytes=1)  # a budget it must not enforce by deleting
        try:
            assert store.read_only
            assert store.lookup(keys) == [True, True, True]
            for got, want in zip(store.wait(store.load(keys, LAYOUT), timeout=10), tensors):
                assert torch.equal(got, want)
            new = make_keys(2, "new")
            assert store.wait(store.dump(new, [block(7), block(8)], LAYOUT), timeout=10) == 0
            assert store.wait(store.dump(new[:1], [block(7)], LAYOUT), timeout=10) == 0
            assert store.lookup(new) == [False, False]
            stats = store.stats()
            assert stats["skipped_read_only"] == 3 and stats["errors"] == 0 and stats["hits"] == 3
        finally:
            store.close()
    assert files_under(root) == before  # nothing written, nothing evicted
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "read-only" in warnings[0].getMessage() and root in warnings[0].getMessage()


def test_writable_root_is_not_read_only(tmp_path):
    with UcmNfsStore(str(tmp_path / "kv")) as store:
        assert not store.read_only


def test_missing_root_that_cannot_be_made_names_storage_backends(tmp_path, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "mkdir", refuse)
    root = tmp_path / "missing" / "kv"
    with pytest.raises(StoreError) as info:
        UcmNfsStore(str(root))
    assert "storage_backends" in str(info.value) and str(root) in str(info.value)
    assert "EROFS" in str(info.value)


# ---- things at a block path that are not block files -----------------------------------------
@pytest.fixture
def store(tmp_path):
    s = UcmNfsStore(str(tmp_path / "kv"), io_threads=2)
    yield s
    s.close()


def _unblock_fifo(path: str) -> None:
    """Open the FIFO's write end once, so a reader stuck in open() (the old behaviour) returns."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting, or already gone


def _in_thread(fn, timeout: float = 5.0):
    result: list = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    return result


def _make_fifo(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mkfifo(path)


def _make_dir(path: str) -> None:
    os.makedirs(path)


@pytest.mark.parametrize("make", [_make_fifo, _make_dir], ids=["fifo", "directory"])
def test_non_regular_file_at_a_block_path_is_a_miss_at_once(store, make, caplog):
    key = make_keys(1, "odd")[0]
    path = store.path_for(key)
    make(path)
    try:
        with caplog.at_level(logging.WARNING, logger="ucm.store.nfs_store"):
            assert _in_thread(lambda: store.lookup([key])) == [[False]]
            loaded = _in_thread(lambda: store.wait(store.load([key], LAYOUT), timeout=4))
            assert loaded == [[None]], "load hung or failed on a non-regular file"
            assert _in_thread(lambda: store.wait(store.load([key], LAYOUT), timeout=4)) == [[None]]
    finally:
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            _unblock_fifo(path)
    assert os.path.lexists(path)  # not ours: left alone
    stats = store.stats()
    assert stats["misses"] == 2 and stats["errors"] == 0 and stats["corrupt"] == 0
    assert stats["not_regular"] == 2
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and path in warned[0].getMessage()  # logged once per path


@pytest.mark.parametrize("make", [_make_fifo, _make_dir], ids=["fifo", "directory"])
def test_non_regular_file_is_neither_indexed_nor_evicted_nor_overwritten(tmp_path, make):
    root = str(tmp_path / "kv")
    key = make_keys(1, "odd")[0]
    with UcmNfsStore(root) as first:
        path = first.path_for(key)
    make(path)
    try:
        with UcmNfsStore(root, capacity_bytes=1) as store:
            assert store.stats()["num_blocks"] == 0
            assert _in_thread(lambda: store.wait(store.dump([key], [block(1)], LAYOUT), timeout=4)) == [0]
            other = make_keys(2, "other")
            store.wait(store.dump(other, [block(2), block(3)], LAYOUT), timeout=4)  # evicts within the budget
    finally:
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            _unblock_fifo(path)
    assert os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode)


def test_open_block_refuses_a_fifo_without_blocking(tmp_path):
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    try:
        got = _in_thread(lambda: pytest.raises(block_files.NotABlockFile, block_files.open_block, fifo))
        assert len(got) == 1
    finally:
        _unblock_fifo(fifo)
    regular = tmp_path / "r"
    regular.write_bytes(b"abc")
    with block_files.open_block(str(regular)) as f:
        assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        block_files.open_block(str(tmp_path / "absent"))


# ---- a real read-only directory ----------------------------------------------------------------
def _as_unprivileged(fn):
    """``fn()`` as a user that permissions apply to: in a forked child as ``nobody`` when
    running as root (root writes into a 0o555 directory regardless); its result comes
    back pickled through a pipe."""
    if os.geteuid() != 0:
        return fn()
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 -- reported to the parent
            out, code = ("error", repr(exc)), 1
        with os.fdopen(w, "wb") as pipe:
            pipe.write(pickle.dumps(out))
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    assert status == "ok", value
    return value


def test_chmod_555_root_is_served_read_only(tmp_path):
    import tempfile

    base = tempfile.mkdtemp(prefix="ucm-ro-")  # outside pytest's 0o700 tmp dirs: "nobody" must reach it
    root = os.path.join(base, "kv")
    try:
        keys, tensors = make_keys(2, "ro"), [block(1), block(2)]
        with UcmNfsStore(root) as writer:
            writer.wait(writer.dump(keys, tensors, LAYOUT))
        before = files_under(root)
        for d, dirs, _names in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(d, name), 0o555)
        os.chmod(root, 0o555)
        os.chmod(base, 0o755)

        def use_it():
            records: list = []
            handler = logging.Handler()
            handler.emit = records.append
            log = logging.getLogger("ucm.store.nfs_store")
            log.addHandler(handler)
            with UcmNfsStore(root) as store:
                loaded = store.wait(store.load(keys, LAYOUT), timeout=10)
                return {"read_only": store.read_only, "lookup": store.lookup(keys),
                        "equal": [torch.equal(a, b) for a, b in zip(loaded, tensors)],
                        "dumped": store.wait(store.dump(make_keys(1, "new"), [block(3)], LAYOUT), timeout=10),
                        "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING]}

        got = _as_unprivileged(use_it)
        assert got["read_only"] and got["lookup"] == [True, True] and got["equal"] == [True, True]
        assert got["dumped"] == 0 and len(got["warnings"]) == 1 and "read-only" in got["warnings"][0]
        assert files_under(root) == before
    finally:
        for d, dirs, _names in os.walk(base):
            os.chmod(d, 0o755)
        import shutil

        shutil.rmtree(base, ignore_errors=True)
