"""Host time of planning one request on the scheduler side (no GPU, no vLLM).

Every request pays ``SchedulerSide.num_new_matched_tokens`` before its first step: the
prompt split, the prefix-chain lookup, every chunk block's lookup and the pay decision.
On a small model this host time is part of TTFT (a 0.5B model's 8K prefill is ~24 ms on
an H100), so it is measured here alone: a DRAM store holding ``--chunks`` chunks of 512
tokens, prompts of a 32-token system prompt, the chunks in a new order and a question.

- ``warm``: every chunk stored (the usual RAG request; under the default pay policy a
  small model runs it as a plain prefill after this plan);
- ``cold``: a salted prompt, nothing stored (every prefix and chunk block hashed and
  looked up);
- ``cannot_pay_warm`` / ``cannot_pay_cold``: the same prompts under the default pay policy
  after it measured a small model's numbers (an 8K prefill ~20 ms, a Blend step ~85 ms):
  reusing the chunks cannot pay even in the best case, so the request runs plain and, since
  ``a4e548e``, its chunks are not looked up or saved. ``--late-decision`` times what the
  scheduler did before that commit for the same requests (the lookup first, then the
  decision; the prompt's exact blocks saved up to its first chunk hit, all of them when cold).

Each mode also times the step metadata of the request's prefill (``build_meta``: the
warm request's chunk loads under ``pay_policy: always``, the cold one's ~1,030 block
saves), which the scheduler builds before that step runs. ``decode32`` times the
connector's ``build_connector_meta`` for a decode step of 32 running requests (most steps
are these; a small model's decode step is ~1.5-4 ms on a GPU).

Prints a table (median and quartiles, ms per plan) and writes it as JSON::

    python benchmarks/plan_host_cpu.py --chunks 16 --out benchmarks/results/plan_host_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

from ucm.config import UcmConfig
from ucm.engine.scheduler_side import SchedulerSide
from ucm.engine.step_meta import ScheduledRequest
from ucm.hashing import HashContext, chunk_block_keys, rank_key
from ucm.sparse.blend.chunking import Delimiter
from ucm.sparse.blend.pay_policy import StepSample
from ucm.store.dram_store import UcmDramStore

END = 2
BLOCK = 16
CHUNK = 512


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _decode_step(side: SchedulerSide, prompt, reps: int) -> dict:
    """``build_connector_meta`` of a step that decodes 32 planned, prefilled requests."""
    from ucm.integration.vllm.connector import UCMConnector  # imports vLLM

    ids = [f"decode-{i}" for i in range(32)]
    for rid in ids:
        p = prompt()
        side.num_new_matched_tokens(rid, p, None, 0, 1.0)
        side.after_alloc(rid, 0)
        side.build_meta([ScheduledRequest(rid, 0, len(p), list(range(-(-len(p) // BLOCK))), new=True)])
    cached = types.SimpleNamespace(req_ids=ids, new_block_ids=[None] * 32, num_computed_tokens=[9000] * 32,
                                   resumed_req_ids=set())
    step = types.SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                 num_scheduled_tokens={rid: 1 for rid in ids})
    connector = types.SimpleNamespace(scheduler_side=side)
    times = []
    for i in tqdm(range(reps * 10 + 100), desc="decode32", leave=False):
        t0 = time.perf_counter()
        meta = UCMConnector.build_connector_meta(connector, step)
        dt = time.perf_counter() - t0
        if i >= 100:
            times.append(dt * 1e3)
    assert not meta.requests, "a decode step of prefilled requests plans nothing"
    q = statistics.quantiles(times, n=4)
    return {"median_ms": round(statistics.median(times), 4), "p25_ms": round(q[0], 4), "p75_ms": round(q[2], 4),
            "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks per prompt (16 x 512 = 8K tokens)")
    ap.add_argument("--reps", type=int, default=200, help="plans timed per mode")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--late-decision", action="store_true",
                    help="cannot_pay_*: weigh the request after its chunk lookup, as before a4e548e")
    args = ap.parse_args()
    rng = random.Random(0)
    ctx = HashContext(model_id="bench", kv_dtype="bf16", tp_size=1)
    seed = ctx.seed(None)
    chunks = [[rng.randrange(10, 30000) for _ in range(CHUNK - 1)] + [END] for _ in range(args.chunks)]
    system = [rng.randrange(10, 30000) for _ in range(31)] + [END]
    store = UcmDramStore(capacity_bytes=1 << 30)
    keys = [rank_key(k, 0) for c in chunks for k in chunk_block_keys(seed, c, BLOCK)]
    store.dump(keys, [torch.zeros(2)] * len(keys), "bench").result()
    config = UcmConfig.from_dict({"block_tokens": BLOCK, "ucm_sparse_config": {"Blend": {
        "chunk_end_token_id": END, "pay_policy": "always"}}})
    side = SchedulerSide(config, store, ctx, BLOCK, 1, Delimiter(chunk_end_token_id=END), num_layers=24)
    small = SchedulerSide(UcmConfig.from_dict({"block_tokens": BLOCK, "ucm_sparse_config": {"Blend": {
        "chunk_end_token_id": END}}}), store, ctx, BLOCK, 1, Delimiter(chunk_end_token_id=END), num_layers=24)
    for rows in (1120, 2144, 4192, 8288):  # a 0.5B model on an H100: host-bound steps
        for _ in range(3):
            small.pay_policy.observe(StepSample(rows=rows, seconds=0.011 + rows * 1.6e-6))
            small.pay_policy.observe(StepSample(rows=rows, blend=True, kept=rows // 5, seconds=0.085))
    if args.late_decision:
        small._cannot_pay = lambda *a, **k: None  # type: ignore[method-assign]

    def prompt() -> list[int]:
        order = rng.sample(range(args.chunks), args.chunks)
        return system + [t for i in order for t in chunks[i]] + [rng.randrange(10, 30000) for _ in range(64)]

    results: dict[str, dict] = {}
    for mode in ("warm", "cold", "cannot_pay_warm", "cannot_pay_cold"):
        plans, metas = [], []
        planner = small if mode.startswith("cannot_pay") else side
        for i in tqdm(range(args.reps + 10), desc=mode, leave=False):
            ids, salt, rid = prompt(), (f"cold-{i}" if mode.endswith("cold") else None), f"{mode}-{i}"
            t0 = time.perf_counter()
            planner.num_new_matched_tokens(rid, ids, salt, 0, 0.15)
            t1 = time.perf_counter()
            planner.after_alloc(rid, 0)
            blocks = list(range(-(-len(ids) // BLOCK)))
            t2 = time.perf_counter()
            planner.build_meta([ScheduledRequest(rid, 0, len(ids), blocks, new=True)])
            t3 = time.perf_counter()
            tracked = planner.finished(rid)
            if mode.startswith("cannot_pay"):
                assert tracked is not None and not (tracked.blends and tracked.plan.chunk_hits), tracked.decision
            if i >= 10:  # the first ten warm the caches
                plans.append((t1 - t0) * 1e3)
                metas.append((t3 - t2) * 1e3)
        for name, times in ((mode, plans), (f"{mode}_meta", metas)):
            q = statistics.quantiles(times, n=4)
            results[name] = {"median_ms": round(statistics.median(times), 3), "p25_ms": round(q[0], 3),
                             "p75_ms": round(q[2], 3), "n": len(times)}
    results["decode32"] = _decode_step(side, prompt, args.reps)
    tokens = len(system) + args.chunks * CHUNK + 64
    print(f"plan host time per request, {tokens}-token prompts ({args.chunks} chunks of {CHUNK}), commit {_commit()}")
    print("| mode | median ms | p25 | p75 |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['median_ms']} | {r['p25_ms']} | {r['p75_ms']} |")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "late_decision": args.late_decision,
                "python": platform.python_version(),
                "machine": platform.machine(), "prompt_tokens": tokens, "chunks": args.chunks, "reps": args.reps}
        args.out.write_text(json.dumps({"meta": meta, "plan": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
