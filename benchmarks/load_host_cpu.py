"""Host time of one chunk load in ``WorkerSide.start_load`` on CPU (no GPU needed).

The GPU path's load phase is mostly Python on the host (store lookup, run coalescing,
index vectors, reusable-row marks); this measures that part in isolation: a DRAM store
holding ``--blocks`` chunk blocks of a 2-layer, 1-head model (so the data copies are
negligible), one request loading all of them with a RoPE shift, FLASH_ATTN-layout CPU
caches. Prints the median milliseconds per ``start_load`` and the top functions by own
time; with ``--defer`` (as with a Blend agent) the part before the forward and the
deferred write (``issue_deferred``, run by the check layer) apart::

    python benchmarks/load_host_cpu.py --blocks 512 [--defer]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from tqdm import tqdm

from ucm.hashing import rank_key
from ucm.engine.kv_saver import BLOCK_LAYOUT
from ucm.engine.step_meta import BlockLoad, RequestStep, StepPlan
from ucm.engine.worker_side import LayerInfo, WorkerSide
from ucm.sparse.blend.rope import RopeSpec
from ucm.store.dram_store import UcmDramStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=512, help="chunk blocks in the load (512 = 8K tokens)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--defer", action="store_true", help="defer the chunk write, as with a Blend agent")
    args = ap.parse_args()
    layers, heads, dim, tokens, vllm_block = 2, 1, 16, 16, 16
    store = UcmDramStore(capacity_bytes=1 << 30)
    spec = RopeSpec(head_dim=dim, rotary_dim=dim, base=10000.0, is_neox_style=True)
    worker = WorkerSide(store, block_tokens=tokens, tp_rank=0, rope=spec, first_check_layer=1,
                        max_step_tokens=args.blocks * tokens)
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, args.blocks + 8, vllm_block, heads, dim)
              for i in range(layers)}
    worker.register(caches, [LayerInfo(n, i, "FLASH_ATTN", heads, dim) for i, n in enumerate(caches)])
    worker.defer_chunk_loads = args.defer
    keys = [i.to_bytes(4, "little") * 4 for i in range(args.blocks)]
    blocks = [torch.randn(layers, 2, tokens, heads, dim) for _ in keys]
    store.wait(store.dump([rank_key(k, 0) for k in keys], blocks, BLOCK_LAYOUT))
    prefix = 32
    loads = [BlockLoad(k, prefix + i * tokens, prefix + i * tokens, prefix + (i + 1) * tokens, prefix, True)
             for i, k in enumerate(keys)]
    n = prefix + args.blocks * tokens + 64
    meta = StepPlan({"r": RequestStep("r", list(range(n // vllm_block + 1)), 0, n, n,
                                                 loads=loads, blend=True)}, True)
    for _ in range(5):
        worker.start_load(meta)
        worker.issue_deferred()
    times, deferred = [], []
    for _ in tqdm(range(args.reps), desc="start_load"):
        t0 = time.perf_counter()
        worker.start_load(meta)
        t1 = time.perf_counter()
        worker.issue_deferred()
        times.append((t1 - t0) * 1e3)
        deferred.append((time.perf_counter() - t1) * 1e3)
    print(f"{args.blocks} blocks: start_load median {statistics.median(times):.2f} ms "
          f"(min {min(times):.2f}, max {max(times):.2f}) over {args.reps}"
          + (f"; deferred write median {statistics.median(deferred):.2f} ms" if args.defer else ""))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        worker.start_load(meta)
        worker.issue_deferred()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
