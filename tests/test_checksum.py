"""The block files' CRC-32: ISA-L's (a dependency) where installed, always equal to zlib's,
so files written by either implementation verify with the other."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import zlib

import pytest

from ucm.store import checksum


@pytest.mark.parametrize("size", [0, 1, 4095, 5 * 1024 + 3, 2 << 20])
def test_crc32_equals_zlibs(size):
    data = os.urandom(size)
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data, 0x1234ABCD) == zlib.crc32(data, 0x1234ABCD)
    assert checksum.crc32(memoryview(bytearray(data))) == zlib.crc32(data)


INSTALLED = "isal" if importlib.util.find_spec("isal") else "zlib"  # setup.py installs isal where it has wheels


def test_the_fast_implementation_is_used_where_installed():
    assert checksum.IMPLEMENTATION == INSTALLED


def test_without_isal_zlibs_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal -> ImportError
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    try:
        fallback = importlib.reload(checksum)
        assert fallback.IMPLEMENTATION == "zlib" and fallback.crc32 is zlib.crc32
    finally:
        monkeypatch.undo()
        importlib.reload(checksum)
    assert checksum.IMPLEMENTATION == INSTALLED
