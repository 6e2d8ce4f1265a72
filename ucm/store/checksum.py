"""CRC-32 of block files: ISA-L's when the ``isal`` package is importable, else zlib's.

Both compute the same CRC-32 (zlib's polynomial and conventions), so files written with
one verify with the other. The checksum is most of a file-tier load's CPU time: zlib's
runs at ~3.7 GB/s per core, ISA-L's at ~12.7 (2 MiB blocks, this repository's VM), and
both release the GIL, so the store's I/O threads run it in parallel.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
    IMPLEMENTATION = "isal"
except ImportError:  # no wheel for this platform: the standard library's
    from zlib import crc32
    IMPLEMENTATION = "zlib"

__all__ = ["crc32", "IMPLEMENTATION"]
