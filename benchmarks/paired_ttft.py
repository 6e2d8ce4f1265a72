"""Paired TTFT: plain vLLM and ucm engines alive at once, each prompt sent to all of them.

Why: on the lent GPU hosts the host's speed drifts by up to 2x over tens of seconds and
differs between processes (a cProfile of the same 8K prefill: torch.mm's launches took 8 ms
per request in one engine process and 12-16 ms in the next), and the model forward of a
small model is host-bound. ``ttft_gpu.py`` runs its engines one after the other, so a
ratio between two engines there carries that drift. Here every engine runs in its own
process for the whole run (an in-process vLLM engine with ``--gpu-mem`` of the GPU), and
each round sends the same prompt to every engine in a shuffled order. A cell's ratio is
the median over rounds of ``plain ms / engine ms`` within the round: rule 3 (measure
against plain vLLM in its default mode, in the same run) at the resolution of one round.

Cells: ``warm`` (pool chunks in a new order; ucm engines ask for ratio 0.15 and their pay
policy decides) and ``cold`` (a salted prompt: nothing reused, ucm saves it), per size;
with ``--decode-batches``, ``decode`` cells: that many RAG prompts of ``--decode-chunks``
chunks at once, ``--decode-tokens`` new tokens each, in ms per output token (the median
over the batch of vLLM's first-to-last-token time per token).

    python benchmarks/paired_ttft.py --pair plain noop dram --shape qwen0.5b --model-dir /tmp/qwen05-shape \\
        --chunks 2 16 --reps 20 --gpu-mem 0.25 --out-dir OUT
    python benchmarks/paired_ttft.py --tiny --pair plain dram --chunks 2 4 --reps 4   # CPU smoke run

Every other option is ``ttft_gpu.py``'s (the engines are built by its ``Bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ttft_gpu as tg  # noqa: E402

REPLY = "@@"  # an engine process's reply lines start with this; every other line is its log
RATIO = 0.15


def serve(args: Any) -> None:
    """One engine process: build, store the chunk pool (ucm), warm up, then answer one
    request per line of stdin (JSON: ids, ratio, salt) with its TTFT and ucm's stats."""
    kind = args.serve_engine
    base = tg.base_kind(kind)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if base not in tg.PLAIN_KINDS:
        os.environ["ENABLE_SPARSE"] = "1"
    bench = tg.Bench(args, kind)
    ucm = base not in tg.PLAIN_KINDS
    if ucm:
        chunk_prompts = [{"prompt_token_ids": c} for c in bench.prompts.chunks]
        bench.llm.generate(chunk_prompts, [bench.params()] * len(chunk_prompts), use_tqdm=False)
    for _ in range(args.warmup_rounds):  # compile/capture sizes; ucm's pay policy measures both paths
        for n in args.chunks:
            bench.one(bench.prompts.rag(n), salt=f"warm-{random.random()}")
            if ucm:
                for ratio in (RATIO, 0.0):
                    bench.one(bench.prompts.rag(n), ratio=ratio)
    print(f"{REPLY}{json.dumps({'ready': kind, 'start_s': bench.start_seconds})}", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        ratio = cmd.get("ratio") if ucm else None
        if "batch" in cmd:  # a decode cell: ms per output token of the batch
            outs = bench.llm.generate([{"prompt_token_ids": ids} for ids in cmd["batch"]],
                                      [bench.params(ratio, cmd["max_tokens"])] * len(cmd["batch"]), use_tqdm=False)
            reply = {"ms": tg._decode_ms(outs), "stats": {}}
        else:
            dt, out = bench.one(cmd["ids"], ratio=ratio, salt=cmd.get("salt"))
            reply = {"ms": dt * 1e3, "stats": bench.stats(out) if ucm else {}}
        print(f"{REPLY}{json.dumps(reply, default=str)}", flush=True)


class Engine:
    """An engine process and its request/reply pipe (its log lines go to a file)."""

    def __init__(self, kind: str, argv: list[str], work_dir: Path) -> None:
        self.kind = kind
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        self.log = open(work_dir / f"log_{kind}.txt", "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--serve-engine", kind],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def reply(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
            self.log.write(line)
        self.log.flush()
        raise RuntimeError(f"engine {self.kind} exited ({self.proc.wait()}); see {self.log.name}")

    def ask(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def stop(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def summarise(samples: dict[tuple[str, int], dict[str, list[dict]]], engines: list[str]) -> dict[str, Any]:
    """Per cell and engine: median ms, and against the first engine the median over rounds
    of its time over this engine's (>1: this engine is faster) and ucm's pay decisions."""
    base = engines[0]
    out: dict[str, Any] = {}
    for (mode, n), per_engine in sorted(samples.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cell: dict[str, Any] = {}
        for kind in engines:
            replies = per_engine[kind]
            ms = [r["ms"] for r in replies]
            entry: dict[str, Any] = {"median_ms": round(statistics.median(ms), 2), "n": len(ms)}
            if kind != base:
                pairs = [b["ms"] / r["ms"] for b, r in zip(per_engine[base], replies)]
                entry["paired_ratio"] = round(statistics.median(pairs), 3)
                entry["paired_ratio_iqr"] = [round(q, 3) for q in statistics.quantiles(pairs, n=4)[::2]] \
                    if len(pairs) >= 4 else None
            decisions: dict[str, int] = {}
            for r in replies:
                reason = r["stats"].get("blend_reason")
                if reason:
                    decisions[reason] = decisions.get(reason, 0) + 1
            if decisions:
                entry["decisions"] = decisions
            cell[kind] = entry
        out[f"{mode}_{n}"] = cell
    return out


def render(summary: dict[str, Any], engines: list[str]) -> str:
    head = "| cell (decode: ms/token) | " + " | ".join(f"{k} ms" for k in engines) + " | " + \
        " | ".join(f"{engines[0]}/{k} (paired)" for k in engines[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(engines) - 1)]
    for cell, per in summary.items():
        lines.append(f"| {cell} | " + " | ".join(f"{per[k]['median_ms']:.1f}" for k in engines) + " | " +
                     " | ".join(f"{per[k]['paired_ratio']:.3f}×" for k in engines[1:]) + " |")
    return "\n".join(lines)


def driver(args: Any, argv: list[str]) -> None:
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.real_model or tg.write_model(Path(args.model_dir), tiny=args.tiny, tiny_layers=args.tiny_layers,
                                                  shape=args.shape)
    if args.dram_gib is None and not args.tiny:
        args.dram_gib = 8
    argv = [*argv, "--model-dir", model_dir] + (["--dram-gib", str(args.dram_gib)] if args.dram_gib else [])
    t0 = time.time()
    engines = [Engine(kind, argv, work_dir) for kind in args.pair]  # they start side by side
    try:
        starts = {e.kind: e.reply() for e in engines}
        print(f"engines ready after {time.time() - t0:.0f} s: {starts}", flush=True)
        prompts = tg.Prompts(pool=max(args.chunks) if args.pool is None else args.pool, seed=args.seed)
        cells = [("warm", n) for n in args.chunks] + ([("cold", n) for n in args.chunks] if args.cold_reps else []) \
            + [("decode", b) for b in args.decode_batches]
        samples: dict[tuple[str, int], dict[str, list[dict]]] = {c: {e.kind: [] for e in engines} for c in cells}
        shuffle = random.Random(args.seed)
        for rep in tg._progress(range(args.reps), "rounds"):
            shuffle.shuffle(cells)
            for mode, n in cells:
                cmd: dict[str, Any] = {"ids": prompts.rag(n), "ratio": RATIO}
                if mode == "decode":
                    cmd = {"batch": [prompts.rag(args.decode_chunks) for _ in range(n)], "ratio": RATIO,
                           "max_tokens": args.decode_tokens}
                if mode == "cold":
                    cmd["salt"] = f"cold-{rep}-{n}-{shuffle.random()}"
                order = list(engines)
                shuffle.shuffle(order)
                for engine in order:
                    samples[(mode, n)][engine.kind].append(engine.ask(cmd))
                # Pairs are by round: every engine's k-th reply is the same prompt.
    finally:
        for engine in engines:
            engine.stop()
    summary = summarise(samples, args.pair)
    meta = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "engines": args.pair,
            "start": starts, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                      capture_output=True, text=True).stdout.strip() or None}
    try:
        import torch

        meta["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        import vllm

        meta["vllm"] = vllm.__version__
    except Exception as err:  # noqa: BLE001 - metadata only
        meta["meta_error"] = repr(err)
    table = render(summary, args.pair)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "cells": summary}, indent=1))
    (out_dir / f"{args.name}.md").write_text(table + "\n")
    print(table, flush=True)


def main() -> None:
    ap = tg.build_parser()
    ap.description = __doc__.split("\n")[0]
    ap.add_argument("--pair", nargs="+", default=["plain", "dram"], choices=sorted(tg.PREFIX),
                    help="engines alive at once; the first is the reference (plain vLLM)")
    ap.add_argument("--serve-engine", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    if args.name == "ttft_gpu":
        args.name = "paired_ttft"
    if args.serve_engine:
        serve(args)
    else:
        driver(args, argv)


if __name__ == "__main__":
    main()
