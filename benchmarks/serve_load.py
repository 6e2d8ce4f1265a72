"""Load and equality through a real server: 64 concurrent mixed requests, all must succeed.

Two servers, one after the other, both with vLLM's prefix caching off:

1. reference: vLLM alone (no KV connector); every distinct prompt sent once as the token
   ids ucm's text-prompt tokenization gives it (text_prompts.tokenize_segments).
2. ucm: ``ucm-serve serve --enable-blend ...`` (the spec's flags, translated by cli_flags;
   pay_policy "always" so every request with chunk hits blends). 64 requests at once:
   blend text prompts (passages in shuffled orders) at ratio 1.0 and at the configured
   ratio, chat requests with the separator inside the message, and plain prompts.

Checks: every request answers 200; the server tokenized each text prompt to the reference
ids; each ratio-1.0 request decodes the same tokens as the full prefill (and its logprobs
are reported as a max difference). Prints one JSON summary.

    python benchmarks/serve_load.py --tiny            # tiny float32 Llama + test BPE tokenizer (CPU)
    python benchmarks/serve_load.py --model DIR       # any supported model with a tokenizer
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEP = " # # "


def build_requests(model: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` mixed requests: (kind, endpoint, body, text)."""
    from tests.tiny_tokenizer import passages

    rng = random.Random(seed)
    pool = passages(6, 60, seed=seed)
    kinds = ["blend_r1"] * (3 * n // 8) + ["blend"] * (n // 4) + ["chat"] * (n // 8)
    kinds += ["plain"] * (n - len(kinds))
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        docs = rng.sample(pool, 4)
        question = f"Question {i % 5}: which market sells salt?"
        text = "Answer from the passages." + SEP + SEP.join(docs) + SEP + question
        common = {"model": model, "max_tokens": 8, "temperature": 0.0}
        if kind == "plain":
            text = " ".join(docs[:2]) + " " + question
        if kind == "chat":
            body = {**common, "messages": [{"role": "user", "content": text}]}
            out.append({"kind": kind, "path": "/v1/chat/completions", "body": body, "text": None})
            continue
        body = {**common, "prompt": text, "return_token_ids": True, "logprobs": 1}
        if kind == "blend_r1":
            body["vllm_xargs"] = {"ucm_blend_ratio": 1.0}
        out.append({"kind": kind, "path": "/v1/completions", "body": body, "text": text})
    return out


def start(server_cls: Any, model: Path, log: Path, kv_config: Any, extra: list[str]) -> Any:
    server = server_cls(model, None, log, kv_config=kv_config, tokenizer=True, extra_args=extra)
    server.wait_healthy()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder with a tokenizer")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 Llama with the test tokenizer (CPU)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if (args.model is None) == (not args.tiny):
        parser.error("give --model DIR or --tiny")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from tests.vllm import test_serve_smoke as smoke
    from ucm.integration.vllm.cli_flags import blend_kv_transfer_config
    from ucm.integration.vllm.text_prompts import tokenize_segments

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ucm-serve-load-"))
    model = args.model
    if args.tiny:
        from tests.tiny_models import build_tiny_model
        from tests.tiny_tokenizer import with_tokenizer

        model = with_tokenizer(build_tiny_model("llama", work / "models"), work / "models")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    requests = build_requests(str(model), args.requests, args.seed)
    for r in requests:
        if r["text"] is not None:
            r["ids"] = (tokenize_segments(tokenizer, r["text"], SEP, True) if SEP in r["text"]
                        else tokenizer.encode(r["text"]))
    common_flags = ["--no-enable-prefix-caching", "--max-num-seqs", str(args.requests)]

    # 1. reference: vLLM alone, full prefills of the ratio-1.0 prompts' token ids.
    ref_server = start(smoke.Server, model, work / "reference.log", False, common_flags)
    try:
        reference = {}
        for r in requests:
            if r["kind"] == "blend_r1" and tuple(r["ids"]) not in reference:
                status, body = ref_server.post("/v1/completions", {**r["body"], "prompt": r["ids"], "vllm_xargs": None})
                assert status == 200, body
                reference[tuple(r["ids"])] = body["choices"][0]
    finally:
        ref_server.stop()

    # 2. ucm with Blend: 64 requests at once.
    kv = blend_kv_transfer_config([1], [0.15], "cpu", SEP)
    kv["kv_connector_extra_config"]["ucm_sparse_config"]["Blend"]["pay_policy"] = "always"
    server = start(smoke.Server, model, work / "ucm.log", kv, common_flags)
    try:
        began = time.perf_counter()
        with cf.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda r: server.post(r["path"], r["body"]), requests))
        wall = time.perf_counter() - began
        alive = server.post("/v1/completions", requests[0]["body"])[0] == 200
    finally:
        server.stop()

    failed = [(r["kind"], status, body) for r, (status, body) in zip(requests, results) if status != 200]
    tokenized_same, equal, unequal, max_lp_diff, hits, chunk_tokens = 0, 0, [], 0.0, 0, 0
    for r, (status, body) in zip(requests, results):
        if status != 200:
            continue
        stats = (body.get("kv_transfer_params") or {}).get("ucm_stats", {})
        hits += stats.get("chunk_hit_tokens", 0)
        chunk_tokens += stats.get("chunk_tokens", 0)
        if r["text"] is not None:
            tokenized_same += body["choices"][0].get("prompt_token_ids") == r["ids"]
        if r["kind"] == "blend_r1":
            ref, got = reference[tuple(r["ids"])], body["choices"][0]
            if got["token_ids"] == ref["token_ids"]:
                equal += 1
            else:
                unequal.append({"got": got["token_ids"], "want": ref["token_ids"]})
            diffs = [abs(a - b) for a, b in zip(got["logprobs"]["token_logprobs"], ref["logprobs"]["token_logprobs"])]
            max_lp_diff = max([max_lp_diff] + diffs)
    summary = {
        "requests": len(requests), "kinds": {k: sum(r["kind"] == k for r in requests) for k in
                                             ("blend_r1", "blend", "chat", "plain")},
        "succeeded": len(requests) - len(failed), "failed": failed[:5], "wall_s": round(wall, 2),
        "text_prompts_tokenized_as_reference": tokenized_same,
        "text_prompts": sum(r["text"] is not None for r in requests),
        "ratio_1_equal_to_full_prefill": equal, "ratio_1_requests": sum(r["kind"] == "blend_r1" for r in requests),
        "ratio_1_max_logprob_diff": max_lp_diff, "unequal": unequal[:3],
        "chunk_hit_tokens": hits, "chunk_tokens": chunk_tokens, "server_alive_after": alive, "workdir": str(work),
    }
    print(json.dumps(summary, indent=1))
    ok = not failed and not unequal and alive and tokenized_same == summary["text_prompts"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
