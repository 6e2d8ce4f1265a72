"""Where does Blend lose quality? Variants of the algorithm on real weights, CPU, float32.

The GPU quality run (docs/BENCHMARKS_QUALITY.md) found Blend at ratio 0.15 3.6 F1 points below a
full prefill. This script asks *why* without vLLM: the pure-torch reference decoder
(``ucm.sparse.blend.reference.TinyDecoder``) loaded with real weights runs, per HotpotQA
question, a full prefill and several Blend variants on the same prompt, and compares the
next-token distribution of each with the full prefill's:

* ``agree``: the greedy first token equals the full prefill's (the example's metric);
* ``kl``: KL(full || variant) of the last-position distribution, nats;
* ``start_sel``: share of chunk-first rows still recomputed after the check layer.

Variants (``--variants``, all by default):

* ``r0`` / ``r15``: ratio 0 / 0.15 at the check layers (``--check-layers``), chunks
  precomputed alone at positions 0..L-1 (what ucm stores today);
* ``r15_start``: as ``r15``, plus every chunk's first token always recomputed;
* ``r0_pre`` / ``r15_pre``: chunks precomputed *behind the prompt prefix* (system
  prompt) and stored without it, so no chunk token was ever at position 0;
* ``r15_grad``: gradual filtering, ratio 0.3 at the first check layer, 0.15 three layers on;
* ``r15_v`` / ``r15_kv``: ratio 0.15 ranking tokens by V / K+V deviation (default: K);
* ``r50``: ratio 0.5 (does recomputing more close the gap at all?).

Usage (Qwen2.5-Coder-0.5B converted by ``benchmarks/qwen_model.py``)::

    python benchmarks/blend_fidelity_cpu.py --model ~/.cache/ucm/models/Qwen2.5-Coder-0.5B-Instruct-f32 \\
        --num-samples 24 --output-json benchmarks/results/blend_fidelity_cpu_qwen.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ucm.rag import BlendPromptBuilder, load_samples  # noqa: E402
from ucm.sparse.blend.reference import KV, TinyDecoder  # noqa: E402
from ucm.sparse.blend.rope import delta_rotate  # noqa: E402

logger = logging.getLogger("blend_fidelity_cpu")

VARIANTS = ("r0", "r15", "r15_start", "r0_pre", "r15_pre", "r15_grad", "r15_v", "r15_kv", "r50")


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


class Chunks:
    """Per-chunk cached KV, computed once per chunk text: alone, or behind the prefix."""

    def __init__(self, model: TinyDecoder, builder: BlendPromptBuilder) -> None:
        self.model = model
        self.builder = builder
        self.alone: dict[tuple[int, ...], KV] = {}
        self.behind: dict[tuple[int, ...], KV] = {}

    def get(self, text: str, behind_prefix: bool) -> KV:
        """KV of ``text``'s chunk tokens at local positions 0..L-1."""
        key = tuple(self.builder.chunk_token_ids(text))
        table = self.behind if behind_prefix else self.alone
        if key not in table:
            if not behind_prefix:
                table[key] = self.model.prefill(torch.tensor(key))[1]
            else:
                # What ucm stores for BlendPromptBuilder.precompute_prompt: the chunk's
                # rows, K rotated back by -start so it sits at 0..L-1 like a lone chunk.
                prompt = self.builder.precompute_prompt(text)
                (start, end), = prompt.chunk_spans
                _, kv = self.model.prefill(torch.tensor(prompt.token_ids))
                pos = torch.arange(start, end)
                table[key] = [(delta_rotate(k[start:end], -start, self.model.cfg.rope, from_positions=pos),
                               v[start:end]) for k, v in kv]
        return table[key]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model = TinyDecoder.from_hf(hf).eval()
    del hf
    builder = BlendPromptBuilder(tokenizer)
    samples = load_samples(args.dataset, args.num_samples, args.seed, min_passages=1)
    chunks = Chunks(model, builder)
    first = args.check_layers[0]
    checks: dict[str, Callable[[], dict[int, float]]] = {
        "r0": lambda: {layer: 0.0 for layer in args.check_layers},
        "r0_pre": lambda: {layer: 0.0 for layer in args.check_layers},
        "r15": lambda: {layer: 0.15 for layer in args.check_layers},
        "r15_start": lambda: {layer: 0.15 for layer in args.check_layers},
        "r15_pre": lambda: {layer: 0.15 for layer in args.check_layers},
        "r15_grad": lambda: {first: 0.3, first + 3: 0.15},
        "r15_v": lambda: {layer: 0.15 for layer in args.check_layers},
        "r15_kv": lambda: {layer: 0.15 for layer in args.check_layers},
        "r50": lambda: {layer: 0.5 for layer in args.check_layers},
    }
    rows: list[dict[str, Any]] = []
    for sample in tqdm(samples, desc="questions"):
        texts = sample.passage_texts()
        order = texts[::-1]  # reversed: an order never precomputed
        built = builder.build(order, sample.question)
        n = len(built.token_ids)
        if n > args.max_tokens:
            logger.warning("sample %s: %d tokens > --max-tokens %d; skipped", sample.id, n, args.max_tokens)
            continue
        ids = torch.tensor(built.token_ids)
        t0 = time.perf_counter()
        full_logits, _ = model.prefill(ids)
        full = full_logits[-1]
        row: dict[str, Any] = {"id": sample.id, "tokens": n, "full_s": time.perf_counter() - t0,
                               "full_token": int(full.argmax())}
        segments: list[tuple[int, int, bool]] = []
        starts = torch.zeros(n, dtype=torch.bool)
        cursor = 0
        for start, end in built.chunk_spans:
            if start > cursor:
                segments.append((cursor, start, False))
            segments.append((start, end, True))
            starts[start] = True
            cursor = end
        segments.append((cursor, n, False))
        for name in args.variants:
            behind = name.endswith("_pre")
            texts_left = iter(order)
            cached: list[Optional[KV]] = [chunks.get(next(texts_left), behind) if reuse else None
                                          for _, _, reuse in segments]
            t0 = time.perf_counter()
            target = {"r15_v": "v", "r15_kv": "kv"}.get(name, "k")
            res = model.blend_prefill(ids, segments, cached, checks[name](), target=target,
                                      always=starts if name == "r15_start" else None)
            mask = res.recompute_mask_per_check_layer[min(res.recompute_mask_per_check_layer)]
            row[name] = {"agree": int(res.last_logits.argmax()) == row["full_token"],
                         "kl": _kl(full, res.last_logits), "fraction": res.recomputed_fraction,
                         "start_sel": float(mask[starts].float().mean()), "s": time.perf_counter() - t0}
        rows.append(row)
        logger.info("%s: %s", sample.id, {v: (row[v]["agree"], round(row[v]["kl"], 3)) for v in args.variants})
    summary = {}
    for name in args.variants:
        kls = sorted(r[name]["kl"] for r in rows)
        summary[name] = {
            "agreement": sum(r[name]["agree"] for r in rows) / len(rows),
            "kl_mean": sum(kls) / len(kls), "kl_median": kls[len(kls) // 2],
            "start_selected": sum(r[name]["start_sel"] for r in rows) / len(rows),
            "recomputed_fraction": sum(r[name]["fraction"] for r in rows) / len(rows),
        }
    return {"summary": summary, "rows": rows}


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder (float32 weights)")
    parser.add_argument("--dataset", default=None, help="HotpotQA/LongBench JSON (default: bundled HotpotQA)")
    parser.add_argument("--num-samples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-layers", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-tokens", type=int, default=4096, help="skip longer prompts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    result = run(args)
    result["meta"] = {"model": Path(args.model).name, "samples": len(result["rows"]), "check_layers": args.check_layers,
                      "commit": _commit(), "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                      "seconds": round(time.time() - started), "command": " ".join(sys.argv)}
    print(f"{'variant':<10} {'agree':>6} {'KL mean':>8} {'KL med':>8} {'starts sel':>10} {'recomp':>7}")
    for name, s in result["summary"].items():
        print(f"{name:<10} {s['agreement']:>6.3f} {s['kl_mean']:>8.4f} {s['kl_median']:>8.4f} "
              f"{s['start_selected']:>10.3f} {s['recomputed_fraction']:>7.3f}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
