"""Store bandwidth: UcmNfsStore / UcmDramStore against a plain-Python baseline.

Why a baseline in the same run: absolute GB/s depends on the disk, the page
cache and the CPU, so the useful number is the ratio store/raw, measured on the
same bytes, machine and moment. The raw baseline writes each block's bytes
with plain ``open().write()`` (no fsync, like the store) and reads them back
with ``open().read()``, one block after another in one thread; the DRAM
baseline is ``tensor.clone()``.

Reads right after writes come from the page cache unless ``--cold`` is given,
which syncs and then drops the page cache for just the benchmark's files
(``posix_fadvise(DONTNEED)``), so reads hit the disk. Nothing else on the
machine is disturbed.

    python benchmarks/store_bandwidth.py --blocks 128 --repeats 3 --output-json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ucm.store import UcmDramStore, UcmNfsStore, checksum  # noqa: E402
from ucm.store.block_format import tensor_bytes  # noqa: E402

# name -> (shape [layers, K/V, block tokens, kv heads, head dim], dtype)
SHAPES = {
    "smollm2-135m-fp32": ((30, 2, 16, 3, 64), torch.float32),
    "llama-8b-bf16": ((32, 2, 16, 8, 128), torch.bfloat16),
}
LAYOUT = "LKBHD"


def make_blocks(shape: tuple, dtype: torch.dtype, n: int, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


def make_keys(n: int, salt: str) -> List[bytes]:
    return [hashlib.sha256(f"{salt}/{i}".encode()).digest() for i in range(n)]


def drop_cache(root: str) -> None:
    """Flush, then evict only the files under ``root`` from the page cache."""
    os.sync()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write(root: str, keys: List[bytes], blocks: List[torch.Tensor]) -> None:
    for key, block in zip(keys, blocks):
        with open(os.path.join(root, key.hex()), "wb") as f:
            f.write(tensor_bytes(block))


def raw_read(root: str, keys: List[bytes]) -> None:
    for key in keys:
        with open(os.path.join(root, key.hex()), "rb") as f:
            f.read()


def in_batches(fn: Callable, keys: List[bytes], batch: int, *rest: List) -> None:
    for i in range(0, len(keys), batch):
        fn(keys[i : i + batch], *(r[i : i + batch] for r in rest))


def bench_shape(name: str, args: argparse.Namespace, bar: tqdm) -> Dict[str, List[float]]:
    """Seconds per (backend, op) for each repeat; every repeat uses fresh directories."""
    shape, dtype = SHAPES[name]
    blocks = make_blocks(shape, dtype, args.blocks, seed=0)
    times: Dict[str, List[float]] = {}

    warm = False  # set per repeat below; record() reads the current value

    def record(label: str, seconds: float) -> None:
        if not warm:
            times.setdefault(label, []).append(seconds)
        bar.update(1)

    for rep in range(args.warmup + args.repeats):
        warm = rep < args.warmup  # first-touch page faults of fresh buffers would skew run 1
        keys = make_keys(args.blocks, f"{name}/{rep}")
        work = tempfile.mkdtemp(prefix="ucm-bw-", dir=args.dir)
        raw_dir = os.path.join(work, "raw")
        os.mkdir(raw_dir)
        store = UcmNfsStore(os.path.join(work, "store"), io_threads=args.io_threads)
        try:
            def dump_batch(k, b):
                store.wait(store.dump(k, b, LAYOUT))

            def load_batch(k):
                assert all(t is not None for t in store.wait(store.load(k, LAYOUT)))

            record("raw/write", timed(lambda: raw_write(raw_dir, keys, blocks)))
            record("nfs/dump", timed(lambda: in_batches(dump_batch, keys, args.batch, blocks)))
            if args.cold:
                drop_cache(work)
            record("raw/read", timed(lambda: raw_read(raw_dir, keys)))
            record("nfs/load", timed(lambda: in_batches(load_batch, keys, args.batch)))
        finally:
            store.close()
            shutil.rmtree(work, ignore_errors=True)

        dram = UcmDramStore(capacity_bytes=2 * args.blocks * blocks[0].nbytes)
        copying = UcmDramStore(capacity_bytes=2 * args.blocks * blocks[0].nbytes, copy_on_load=True)
        # What the format's checksum alone costs, single-threaded: explains most of the store/raw gap.
        record("crc32", timed(lambda: [checksum.crc32(tensor_bytes(b)) for b in blocks]))
        # Both sides allocate fresh memory; the raw clones stay alive so the store cannot reuse
        # their already-faulted pages, and the order alternates so neither always goes first.
        clones: List[torch.Tensor] = []

        def clone_all() -> None:
            clones.extend(b.clone() for b in blocks)

        def dram_dump() -> None:
            in_batches(lambda k, b: dram.wait(dram.dump(k, b, LAYOUT)), keys, args.batch, blocks)

        pair = [("raw/clone", clone_all), ("dram/dump", dram_dump)]
        for label, fn in pair if rep % 2 else pair[::-1]:
            record(label, timed(fn))
        record("dram/load", timed(lambda: in_batches(lambda k: dram.wait(dram.load(k, LAYOUT)), keys, args.batch)))
        copying.wait(copying.dump(keys, blocks, LAYOUT))
        record("dram/load-copy", timed(lambda: in_batches(lambda k: copying.wait(copying.load(k, LAYOUT)), keys, args.batch)))
        dram.close()
        copying.close()
        clones.clear()
    return times


# store op -> the raw op it is compared with
BASELINE = {
    "nfs/dump": "raw/write",
    "nfs/load": "raw/read",
    "dram/dump": "raw/clone",
    "dram/load": None,  # zero-copy: measures bookkeeping only, no baseline makes sense
    "dram/load-copy": "raw/clone",
    "crc32": None,
}


def summarize(name: str, times: Dict[str, List[float]], total_bytes: int) -> List[Dict[str, object]]:
    gbps = {label: total_bytes / statistics.median(ts) / 1e9 for label, ts in times.items()}
    rows = []
    for label, raw_label in BASELINE.items():
        raw = gbps[raw_label] if raw_label else None
        rows.append({
            "shape": name, "op": label, "store_gbps": gbps[label], "baseline": raw_label or "-",
            "raw_gbps": raw, "ratio": gbps[label] / raw if raw else None,
            "median_s": statistics.median(times[label]),
            "best_gbps": total_bytes / min(times[label]) / 1e9,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=128, help="blocks per shape and repeat")
    parser.add_argument("--batch", type=int, default=16, help="blocks per dump/load call")
    parser.add_argument("--io-threads", type=int, default=4, help="UcmNfsStore io_threads")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads; >1 on a busy small machine makes clone() erratic")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dir", default=None, help="parent dir for temp dirs (default: system temp)")
    parser.add_argument("--cold", action="store_true", help="drop page cache of the written files before reads")
    parser.add_argument("--output-json", default=None, help="also write results here")
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    steps_per_repeat = 9
    rows = []
    total_steps = len(args.shapes) * (args.warmup + args.repeats) * steps_per_repeat
    with tqdm(total=total_steps, desc="store bandwidth") as bar:
        for name in args.shapes:
            shape, dtype = SHAPES[name]
            block_bytes = torch.empty(shape, dtype=dtype).nbytes
            rows += summarize(name, bench_shape(name, args, bar), block_bytes * args.blocks)

    header = f"{'shape':<20} {'op':<15} {'store GB/s':>10} {'baseline':<10} {'raw GB/s':>9} {'store/raw':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        raw = f"{r['raw_gbps']:>9.2f}" if r["raw_gbps"] else f"{'-':>9}"
        ratio = f"{r['ratio']:>9.2f}" if r["ratio"] else f"{'-':>9}"
        print(f"{r['shape']:<20} {r['op']:<15} {r['store_gbps']:>10.2f} {r['baseline']:<10} {raw} {ratio}")
    if args.output_json:
        meta = {"argv": sys.argv, "args": vars(args), "python": platform.python_version(),
                "torch": torch.__version__, "cpus": os.cpu_count(),
                "block_bytes": {n: torch.empty(SHAPES[n][0], dtype=SHAPES[n][1]).nbytes for n in args.shapes}}
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
