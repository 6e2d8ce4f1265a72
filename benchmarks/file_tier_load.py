"""Where the time of a file-tier load goes: one load of an 8K-token prompt's blocks.

``UcmNfsStore.load`` of N blocks (default 512 x 2 MiB, a Llama-8B bf16 8K prompt) from a
warm page cache, next to what its parts cost alone with the same thread count: raw
``readinto`` of the same files into one host buffer; the same plus the payload CRC-32 (the store's implementation, ``checksum``);
the store with the recency update (``os.utime`` per block) switched off; the store
reading into one buffer allocated before the timing; and that allocation alone, served
from torch's host cache after the warm-up (``first_buffer_ms``: the first, page-locking one). GB/s of
payload, median of ``--reps`` after one warm-up load::

    python benchmarks/file_tier_load.py --dir /var/tmp/ucm_file_bench --threads 4 8 16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ucm.store import checksum, nfs_store, read_buffers  # noqa: E402
from ucm.store.block_format import tensor_bytes  # noqa: E402

LAYOUT = "LKBHD"
SHAPE = (32, 2, 16, 8, 128)  # Llama-3-8B, 16-token blocks, bf16: 2 MiB


def timed(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up: page cache, pinned buffers
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/ucm_file_bench")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--threads", type=int, nargs="+", default=[8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    keys = [hashlib.sha256(f"b{i}".encode()).digest() for i in range(args.blocks)]
    block = torch.randn(SHAPE).to(torch.bfloat16)
    nbytes = block.numel() * block.element_size()
    total = nbytes * args.blocks
    writer = nfs_store.UcmNfsStore(args.dir, io_threads=8)
    writer.wait(writer.dump(keys, [block] * args.blocks, LAYOUT))
    paths = [writer.path_for(k) for k in keys]
    writer.close()
    header = os.path.getsize(paths[0]) - nbytes
    results: dict[str, Any] = {"blocks": args.blocks, "block_bytes": nbytes, "pinned": read_buffers.pinned.AVAILABLE,
                               "cpus": os.cpu_count(), "crc32": checksum.IMPLEMENTATION, "rows": []}
    first = read_buffers.PinnedReads(total)
    t0 = time.perf_counter()
    first.buffer(total)
    results["first_buffer_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    for threads in args.threads:
        store = nfs_store.UcmNfsStore(args.dir, io_threads=threads)
        pool = cf.ThreadPoolExecutor(threads)
        buf = store._pinned_reads.buffer(total)
        views = [tensor_bytes(buf[i * nbytes:(i + 1) * nbytes]) for i in range(args.blocks)]

        def raw(crc: bool) -> None:
            def one(i: int) -> None:
                with open(paths[i], "rb", buffering=0) as f:
                    f.seek(header)
                    f.readinto(views[i])
                if crc:
                    checksum.crc32(views[i])
            list(pool.map(one, range(args.blocks)))

        def load() -> None:
            got = store.wait(store.load(keys, LAYOUT))
            assert all(t is not None for t in got)

        row = {"threads": threads}
        row["raw_read_gbps"] = round(total / timed(lambda: raw(False), args.reps) / 1e9, 2)
        row["raw_read_crc_gbps"] = round(total / timed(lambda: raw(True), args.reps) / 1e9, 2)
        row["store_load_gbps"] = round(total / timed(load, args.reps) / 1e9, 2)
        real_utime = os.utime
        nfs_store.os.utime = lambda *a, **k: None  # the store's module-level os is this os
        try:
            row["store_load_no_utime_gbps"] = round(total / timed(load, args.reps) / 1e9, 2)
        finally:
            nfs_store.os.utime = real_utime
        real_buffer = store._pinned_reads.buffer
        row["host_buffer_ms"] = round(timed(lambda: real_buffer(total), args.reps) * 1e3, 2)  # from the cache
        store._pinned_reads.buffer = lambda nbytes: buf if nbytes == total else real_buffer(nbytes)
        try:  # the read buffer allocated once, outside the timing
            row["store_load_kept_buffer_gbps"] = round(total / timed(load, args.reps) / 1e9, 2)
        finally:
            del store._pinned_reads.buffer
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        store.close()
        pool.shutdown()
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
