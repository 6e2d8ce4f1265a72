"""TTFT of Blend on a GPU: Llama-3-8B-shaped model, RAG prompts, vLLM with and without ucm.

Each engine configuration runs in its own process (vLLM holds process-wide state);
this script is both the driver and (with ``--engine``) the per-engine worker:

* ``plain``: vLLM alone, prefix caching on. Full prefill (a unique ``cache_salt``
  per request, so nothing is reused) and the prefix-cache hit of the same prompt
  asked again (the floor: no recompute at all, KV already in HBM).
* ``dram``: UCMBlendConnector with a host-memory store (ENABLE_SPARSE=1, vLLM prefix
  caching off so every reuse goes through ucm). The chunks are precomputed, then
  prompts with the chunks in fresh random orders are asked at each Blend ratio
  (per-request ``SamplingParams(extra_args={"ucm_blend_ratio": r})``).
* ``file``: the same with the file store (UcmNfsStore) on local disk, no host-memory
  tier; reads come from the page cache unless ``--file-cold`` (which drops the store
  files from the page cache with posix_fadvise before each request).

TTFT of one request = wall time of ``LLM.generate`` of that request alone with
``max_tokens=1`` (after warm-up); median over ``--reps`` requests. Throughput: the
same engine given ``--concurrency`` RAG requests at once (requests/s and mean TTFT
from vLLM's request metrics), each asking ``--tput-max-tokens`` new tokens.

``--mode default`` (the default) runs every engine in vLLM's default mode
(torch.compile + CUDA graphs); ``--mode eager`` sets ``enforce_eager=True`` in every
engine. An engine kind ending in ``_eager`` (``plain_eager``, ``dram_eager``) is eager
whatever ``--mode`` says, so both modes can be timed side by side in one run.
``--decode-batches 1 32`` adds decode time per output token (ms/token) at those batch
sizes: ``--decode-tokens`` greedy tokens after a RAG prompt of ``--decode-chunks`` chunks
(plain: a full prefill; ucm: Blend at 0.15), from vLLM's per-request timestamps.

    PYTHONPATH=/tmp/site:. VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 \\
        python benchmarks/ttft_gpu.py --out-dir $OUT

``--plot-only results.json`` redraws the table and plot from a saved run.
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
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16", "attention_bias": False,
    "mlp_bias": False,
}
#: Qwen2.5-Coder-0.5B's shape (its config.json): the small model where a plain prefill is
#: cheap and ucm's fixed cost per request decides whether blending pays.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 24,
}
SHAPES = {"llama8b": LLAMA3_8B, "qwen0.5b": QWEN25_05B}
END = 128001  # chunk_end_token_id; never drawn as a content token
CHUNK = 512
SYSTEM = 32
QUESTION = 64


# ---------------------------------------------------------------------------------- prompts
class Prompts:
    """A pool of 512-token chunks (511 random tokens + END), a system prompt and questions."""

    def __init__(self, pool: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        pick = lambda n: [self.rng.randrange(1000, 128000) for _ in range(n)]  # noqa: E731
        self.system = pick(SYSTEM - 1) + [END]
        self.chunks = [pick(CHUNK - 1) + [END] for _ in range(pool)]
        self._pick = pick

    def question(self) -> list[int]:
        return self._pick(QUESTION)

    def rag(self, n_chunks: int) -> list[int]:
        """A fresh random choice and order of ``n_chunks`` pool chunks, and a fresh question."""
        order = self.rng.sample(range(len(self.chunks)), n_chunks)
        ids = list(self.system)
        for i in order:
            ids += self.chunks[i]
        return ids + self.question()


# ---------------------------------------------------------------------------------- engine side
def _progress(it, desc: str):
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=5.0, file=sys.stderr)


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 2)


def _decode_ms(outs: list[Any], each: bool = False) -> Any:
    """Decode ms per output token of finished requests from vLLM's engine-core
    timestamps (first to last token, so the prefill is not in it): each request's
    value, or their median."""
    vals = []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is None or n < 2 or not getattr(m, "last_token_ts", 0) or not getattr(m, "first_token_ts", 0):
            continue
        vals.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1e3)
    if each:
        return vals
    return round(statistics.median(vals), 3) if vals else None


def _summarise_stats(stats: list[dict]) -> dict:
    """ucm's per-request stats over a batch: means of the numbers, counts of the other
    values (e.g. a per-request Blend decision), so a policy's choice shows in the result."""
    out: dict[str, Any] = {}
    keys = sorted({k for s in stats for k in s})
    for k in keys:
        vals = [s.get(k) for s in stats if s.get(k) is not None]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = round(statistics.mean(vals), 3)
        elif vals and all(isinstance(v, (str, bool)) for v in vals):
            counts: dict[str, int] = {}
            for v in vals:
                counts[str(v)] = counts.get(str(v), 0) + 1
            out[k] = counts
    return out


def _time_gc() -> None:
    """Count Python's garbage-collector pauses as host phases ``gc0``/``gc1``/``gc2``: a
    full collection stops every thread of the engine process, whatever it was doing."""
    import gc

    from ucm.engine.host_time import HOST_TIMES

    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = HOST_TIMES.start()
        else:
            HOST_TIMES.add(f"gc{info['generation']}", started[0])

    gc.callbacks.append(timer)


def _wait_saves(inflight: Any, limit_s: float = 30.0) -> None:
    """Wait (at most ``limit_s``) until this process has no save in flight. With
    ``--tp`` > 1 the saves run in the worker processes and this returns at once."""
    deadline = time.perf_counter() + limit_s
    while len(inflight) and time.perf_counter() < deadline:
        time.sleep(0.05)


def _allocator_counts() -> dict[str, int]:
    """Device segments the caching allocator allocated/freed and its retries (a retry
    frees cached segments, which synchronises the device: a host stall)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def base_kind(kind: str) -> str:
    """The engine configuration of a kind: ``plain_eager`` is ``plain`` forced eager;
    ``plain_again`` is ``plain`` once more, in a process of its own (how far two engine
    processes of one configuration differ on this host)."""
    for suffix in ("_eager", "_again"):
        if kind.endswith(suffix):
            return kind[: -len(suffix)]
    return kind


PLAIN_KINDS = ("plain", "noop", "prefix")
"""Engines that run vLLM's own prefill on every request: plain vLLM, vLLM with a connector
that does nothing (``noop``: what any connector costs), ucm's prefix connector alone
(``prefix``: no Blend, no patches)."""


def eager_for(kind: str, mode: str) -> bool:
    """``enforce_eager`` of an engine: ``--mode`` decides, a ``_eager`` kind is always eager."""
    return mode == "eager" or kind.endswith("_eager")


class Bench:
    def __init__(self, args: argparse.Namespace, kind: str) -> None:
        self.args = args
        self.kind = kind
        self.base = base_kind(kind)  # what the engine is; self.kind is its label
        self.prompts = Prompts(pool=max(args.chunks) if args.pool is None else args.pool, seed=args.seed)
        self.llm = self._engine()
        from vllm import SamplingParams

        self.SamplingParams = SamplingParams
        self.results: dict[str, Any] = {"kind": kind, "modes": {}, "throughput": {}}
        self.host_times: list[dict[str, float]] = []  # ucm's host time per phase, per timed request
        if args.host_times:
            _time_gc()
        self.allocator = _allocator_counts()
        self.allocator_by_mode: dict[tuple[str, int], dict[str, int]] = {}  # filled by _interleaved


    def _engine(self):
        from vllm import LLM
        from vllm.config import KVTransferConfig

        a = self.args
        engine: dict[str, Any] = dict(
            model=a.model_dir, load_format="auto" if a.real_model else "dummy", skip_tokenizer_init=True, dtype=a.dtype,
            enforce_eager=eager_for(self.kind, a.mode), max_model_len=a.max_model_len, max_num_batched_tokens=a.max_batched_tokens,
            max_num_seqs=max(64, a.concurrency), gpu_memory_utilization=a.gpu_mem, seed=0,
            # vLLM's default: prefix caching on for every engine, ucm's included.
            disable_log_stats=False, enable_prefix_caching=True,
            tensor_parallel_size=a.tp, async_scheduling=a.scheduling == "async")
        if self.base == "noop":  # vLLM's cost of any connector: one that does nothing
            engine["kv_transfer_config"] = KVTransferConfig(
                kv_connector="NoopConnector", kv_connector_module_path="benchmarks.noop_connector", kv_role="kv_both")
        elif self.base != "plain":
            if self.base.startswith("dram") or self.base in ("epic", "prefix"):
                stores = [{"ucm_connector_name": "UcmDramStore",
                           "ucm_connector_config": {} if a.dram_gib is None else
                           {"capacity_bytes": a.dram_gib * 2**30}}]
            else:
                stores = [{"ucm_connector_name": "UcmNfsStore",
                           "ucm_connector_config": {"storage_backends": a.file_dir, "io_threads": a.io_threads}}]
            block_tokens = 64 if self.base == "dram_b64" else a.block_tokens
            if self.base == "epic":
                method = {"EPIC": {"chunk_end_token_id": END, "recompute_tokens": a.epic_ks[0]}}
            else:
                method = {"Blend": {"chunk_end_token_id": END,
                                    "compute_meta": {f"model.layers.{a.check_layer}.self_attn.attn": {"ratio": 0.15}}}}
            extra = {"ucm_connectors": stores, "block_tokens": block_tokens, "ucm_sparse_config": method}
            if a.pay_policy:  # else ucm's default (auto: blend a request only where it measured faster)
                next(iter(method.values()))["pay_policy"] = a.pay_policy
            options = {}
            if self.base == "dram_nodefer":
                options["defer_chunk_loads"] = False
            if self.base == "dram_nativeops":
                options["eager_kernels"] = False
            load_group = -1 if self.base in ("dram_whole", "dram_torchload") else a.load_group
            if load_group is not None:
                options["load_layer_group"] = load_group
            if options:
                extra["engine_options"] = options
            if self.base == "prefix":  # ucm's prefix connector alone: no Blend, no patches
                extra.pop("ucm_sparse_config")
                connector, module = "UCMConnector", "ucm.integration.vllm.connector"
            else:
                connector, module = "UCMBlendConnector", "ucm.integration.vllm.blend_connector"
            engine["kv_transfer_config"] = KVTransferConfig(
                kv_connector=connector, kv_connector_module_path=module,
                kv_role="kv_both", kv_connector_extra_config=extra)
        t0 = time.time()
        llm = LLM(**engine)
        self.start_seconds = round(time.time() - t0, 1)
        return llm

    def params(self, ratio: Optional[float] = None, max_tokens: int = 1):
        """``ratio`` is the Blend ratio; on the EPIC engine it is k (tokens per chunk)."""
        if ratio is None:
            extra = None
        elif self.base == "epic":
            extra = {"ucm_epic_tokens": int(ratio)}
        else:
            extra = {"ucm_blend_ratio": ratio}
        return self.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    def one(self, ids: list[int], ratio: Optional[float] = None, salt: Optional[str] = None) -> tuple[float, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if salt:
            prompt["cache_salt"] = salt
        if self.args.host_times:
            from ucm.engine.host_time import HOST_TIMES

            HOST_TIMES.enabled = True
            HOST_TIMES.take()  # drop what earlier, untimed work left
        t0 = time.perf_counter()
        out = self.llm.generate([prompt], [self.params(ratio)], use_tqdm=False)[0]
        dt = time.perf_counter() - t0
        if self.args.host_times:
            self.host_times.append(HOST_TIMES.take())
        return dt, out

    def stats(self, out: Any) -> dict:
        from ucm.engine.stats import request_stats

        return request_stats(out.request_id)

    def _interleaved(self, modes: list[tuple[tuple[str, int], Callable[[], tuple[float, Any]]]],
                     label: str) -> dict[tuple[str, int], tuple[list[float], list[Any], list[dict]]]:
        """``--reps`` rounds, each timing one request of every mode in an order shuffled per
        round: a drift of the host's speed over the run (seen on the GPU host: 15-20 ms
        per request for tens of seconds) then lands on every mode alike, not on whichever
        ran first. Returns per mode the times, the outputs and ucm's host times per
        request; the CUDA allocator's counts per mode go to ``allocator_by_mode``."""
        samples: dict[tuple[str, int], tuple[list[float], list[Any], list[dict]]] = {
            key: ([], [], []) for key, _ in modes}
        self.allocator_by_mode = {key: {} for key, _ in modes}
        order = list(modes)
        shuffle = random.Random(self.args.seed)
        for _ in _progress(range(self.args.reps), f"{label} rounds"):
            shuffle.shuffle(order)  # no mode always follows the same one (e.g. a save's tail)
            for key, run in order:
                before = _allocator_counts()
                dt, out = run()
                after = _allocator_counts()
                counts = self.allocator_by_mode[key]
                for name, value in after.items():
                    counts[name] = counts.get(name, 0) + value - before.get(name, 0)
                times, outs, hosts = samples[key]
                times.append(dt)
                outs.append(out)
                if self.args.host_times:
                    hosts.append(self.host_times[-1])
        self.host_times = []
        self.allocator = _allocator_counts()
        return samples

    def record(self, mode: str, n_chunks: int, times: list[float], stats: Optional[list[dict]] = None,
               hosts: Optional[list[dict]] = None) -> None:
        entry: dict[str, Any] = {"median_ms": _median_ms(times), "min_ms": round(min(times) * 1e3, 2),
                                 "max_ms": round(max(times) * 1e3, 2), "n": len(times),
                                 "times_ms": [round(t * 1e3, 1) for t in times]}
        if stats:
            for key in ("chunk_hit_tokens", "prefix_hit_tokens", "recompute_ratio", "reusable_tokens"):
                vals = [s.get(key) for s in stats if s.get(key) is not None]
                if vals:
                    entry[key] = round(statistics.mean(vals), 3)
            entry["ucm"] = _summarise_stats(stats)
        by_mode = self.allocator_by_mode.get((mode, n_chunks))
        if by_mode is not None:  # counted around each of this mode's requests (interleaved modes)
            entry["allocator"] = by_mode
        else:  # the CUDA caching allocator's cudaMalloc/cudaFree since the last mode
            allocator = _allocator_counts()
            entry["allocator"] = {k: v - self.allocator.get(k, 0) for k, v in allocator.items()}
            self.allocator = allocator
        if hosts is None:
            hosts, self.host_times = self.host_times[-len(times):], []
        phases = sorted({p for h in hosts for p in h})
        if self.args.host_times and phases:
            entry["host_ms"] = {p: _median_ms([h.get(p, 0.0) for h in hosts]) for p in phases}
            entry["host_ms_max"] = {p: round(max(h.get(p, 0.0) for h in hosts) * 1e3, 2) for p in phases}
            print(f"[{self.kind}] {n_chunks:2d} chunks {mode:>14}: host ms {entry['host_ms']}", flush=True)
        self.results["modes"].setdefault(str(n_chunks), {})[mode] = entry
        print(f"[{self.kind}] {n_chunks:2d} chunks {mode:>14}: median {entry['median_ms']:8.2f} ms "
              f"(min {entry['min_ms']}, max {entry['max_ms']}) {({k: v for k, v in entry.items() if 'hit' in k or 'ratio' in k})}",
              flush=True)

    def rag_batch(self, count: int, n_chunks: int, salt: Optional[str]) -> list[dict[str, Any]]:
        """``count`` RAG prompts of ``n_chunks`` chunks in new orders; with ``salt``, each
        under its own cache salt (cold in every cache)."""
        prompts: list[dict[str, Any]] = []
        for i in range(count):
            p: dict[str, Any] = {"prompt_token_ids": self.prompts.rag(n_chunks)}
            if salt is not None:
                p["cache_salt"] = f"{salt}-{i}"
            prompts.append(p)
        return prompts

    def throughput(self, mode: str, n_chunks: int, ratio: Optional[float], salted: bool) -> None:
        c = self.args.concurrency
        prompts = self.rag_batch(c, n_chunks, f"tput-{n_chunks}-{time.time()}" if salted else None)
        new = self.args.tput_max_tokens
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, [self.params(ratio, max_tokens=new)] * c, use_tqdm=False)
        wall = time.perf_counter() - t0
        ttfts = [o.metrics.first_token_latency for o in outs
                 if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", 0)]
        entry = {"requests": c, "max_tokens": new, "wall_s": round(wall, 3), "req_per_s": round(c / wall, 2),
                 "output_tok_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / wall, 1),
                 "mean_ttft_ms": round(statistics.mean(ttfts) * 1e3, 1) if ttfts else None,
                 "ttft_source": "vllm metrics first_token_latency" if ttfts else "none"}
        if new > 1:
            entry["decode_ms_per_token"] = _decode_ms(outs)
        stats = [self.stats(o) for o in outs] if self.base != "plain" else []
        if stats:
            entry["ucm"] = _summarise_stats(stats)
        self.results["throughput"].setdefault(str(n_chunks), {})[mode] = entry
        print(f"[{self.kind}] throughput {n_chunks:2d} chunks {mode}: {entry}", flush=True)

    def decode(self, mode: str, ratio: Optional[float], salted: bool) -> None:
        """Decode time per output token of one mode (see :meth:`decode_modes`)."""
        self.decode_modes([(mode, ratio)], salted)

    def decode_modes(self, modes: list[tuple[str, Optional[float]]], salted: bool) -> None:
        """Decode time per output token at each ``--decode-batches`` size: that many RAG
        prompts of ``--decode-chunks`` chunks at once, ``--decode-tokens`` greedy tokens
        each; per request (last_token_ts - first_token_ts) / (tokens - 1) from vLLM's
        engine-core timestamps (the prefill is outside it), median over requests and
        ``--decode-reps`` repeats. The wall time of the batch is kept next to it.

        Several ``(mode, ratio)`` are timed in alternation, repeat by repeat (their order
        turning each repeat): the host's speed drifts over tens of seconds, and timed one
        after the other a later mode read up to 17% slower per token in the same engine."""
        a = self.args
        n_tok = a.decode_tokens
        chunks = min(a.decode_chunks, len(self.prompts.chunks))
        for batch in a.decode_batches:
            per_token: dict[str, list[float]] = {m: [] for m, _ in modes}
            walls: dict[str, list[float]] = {m: [] for m, _ in modes}
            last: dict[str, Any] = {}
            for rep in range(a.decode_reps + 1):  # the first repeat is a warm-up
                turn = rep % len(modes)
                for mode, ratio in modes[turn:] + modes[:turn]:
                    prompts = self.rag_batch(batch, chunks, f"decode-{batch}-{rep}-{random.random()}" if salted else None)
                    t0 = time.perf_counter()
                    outs = self.llm.generate(prompts, [self.params(ratio, max_tokens=n_tok)] * batch,
                                             use_tqdm=False)
                    wall = time.perf_counter() - t0
                    if rep:
                        per_token[mode] += _decode_ms(outs, each=True)
                        walls[mode].append(wall)
                        last[mode] = outs
            for mode, _ in modes:
                times = per_token[mode]
                entry = {"batch": batch, "new_tokens": n_tok, "context_chunks": chunks,
                         "ms_per_token": round(statistics.median(times), 3) if times else None,
                         "ms_per_token_min": round(min(times), 3) if times else None,
                         "ms_per_token_max": round(max(times), 3) if times else None,
                         "wall_s": [round(w, 3) for w in walls[mode]]}
                if self.base != "plain" and mode in last:
                    entry["ucm"] = _summarise_stats([self.stats(o) for o in last[mode]])
                self.results.setdefault("decode", {}).setdefault(str(batch), {})[mode] = entry
                print(f"[{self.kind}] decode batch {batch:2d} {mode}: {entry}", flush=True)

    # ---- the scenarios ------------------------------------------------------------
    def run_plain(self) -> None:
        a = self.args
        for _ in range(3):  # warm-up
            self.one(self.prompts.rag(min(a.chunks)), salt=f"warm{random.random()}")
        hit_ids = {n: self.prompts.rag(n) for n in a.chunks}
        for ids in hit_ids.values():
            self.one(ids)  # cached from here on
        samples = self._interleaved(
            [(("full_prefill", n), lambda n=n: self.one(self.prompts.rag(n), salt=f"full-{n}-{random.random()}"))
             for n in a.chunks]
            + [(("prefix_hit", n), lambda n=n: self.one(hit_ids[n])) for n in a.chunks], "plain")
        for (mode, n), (times, _, hosts) in samples.items():
            self.record(mode, n, times, hosts=hosts)
        if a.concurrency:
            for n in a.tput_chunks or a.chunks:
                self.throughput("full_prefill", n, None, salted=True)
        if a.decode_batches:
            self.decode("decode_full_prefill", None, salted=True)

    def _drop_page_cache(self) -> None:
        for dirpath, _, names in os.walk(self.args.file_dir):
            for name in names:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                except OSError:
                    pass

    def run_ucm(self) -> None:
        a = self.args
        t0 = time.perf_counter()
        chunk_prompts = [{"prompt_token_ids": c} for c in self.prompts.chunks]
        self.llm.generate(chunk_prompts, [self.params()] * len(chunk_prompts), use_tqdm=False)
        self.results["precompute_s"] = round(time.perf_counter() - t0, 2)
        # Sanity: ratio 1.0 must match the plain path (a salted request reuses nothing).
        checks = []
        for n in sorted(set(a.chunks)):
            ids = self.prompts.rag(n)
            full = {"ucm_epic_tokens": CHUNK} if self.base == "epic" else {"ucm_blend_ratio": 1.0}
            sp = lambda r: self.SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, ignore_eos=True,  # noqa: E731
                                               extra_args=full if r is not None else None)
            ref = self.llm.generate([{"prompt_token_ids": ids, "cache_salt": f"check{random.random()}"}], [sp(None)],
                                    use_tqdm=False)[0].outputs[0]
            got = self.llm.generate([{"prompt_token_ids": ids}], [sp(1.0)], use_tqdm=False)[0]
            st = self.stats(got)
            got = got.outputs[0]
            a_lp, b_lp = ref.logprobs[0], got.logprobs[0]
            shared = set(a_lp) & set(b_lp)
            checks.append({"chunks": n, "same_token": ref.token_ids == got.token_ids,
                           "max_dlogprob_top5": round(max((abs(a_lp[t].logprob - b_lp[t].logprob) for t in shared),
                                                          default=float("nan")), 4),
                           "shared_top5": len(shared), "chunk_hit_tokens": st.get("chunk_hit_tokens")})
        self.results["ratio1_check"] = checks
        print(f"[{self.kind}] ratio 1.0 vs plain path: {checks}", flush=True)
        # Warm-up (also saves the system-prompt blocks once). Several rounds over every
        # size: with one, the first size timed after engine start ran 5-15 ms slower per
        # request with a wide spread (BENCHMARKS.md, sixth session, "the 3K column").
        for _ in range(a.warmup_rounds):
            for n in a.chunks:
                for r in ((a.epic_ks[0], 0) if self.base == "epic" else (0.15, 0.0)):
                    self.one(self.prompts.rag(n), ratio=r)
        ratios = {"dram": a.ratios, "dram_nativeops": a.ratios, "dram_b64": a.b64_ratios, "epic": a.epic_ks}.get(self.base, a.file_ratios)
        if self.base.startswith("file") and a.file_cold:
            os.sync()
        def blend(n: int, r: float) -> tuple[float, Any]:
            if self.base.startswith("file") and a.file_cold:
                self._drop_page_cache()
            return self.one(self.prompts.rag(n), ratio=r)

        label = "k" if self.base == "epic" else "blend_"
        samples = self._interleaved([((f"{label}{r:g}", n), lambda n=n, r=r: blend(n, r))
                                     for n in a.chunks for r in ratios], self.kind)
        for (mode, n), (times, outs, hosts) in samples.items():
            self.record(mode, n, times, [self.stats(o) for o in outs], hosts=hosts)
        if a.concurrency and self.base == "dram":
            for n in a.tput_chunks or a.chunks:
                self.throughput("blend_0.15", n, 0.15, salted=False)
        if a.decode_batches and self.base != "epic":
            self.decode("decode_blend_0.15", 0.15, salted=False)
        if self.base == "dram" and a.cold_reps:
            for n in a.chunks:  # cold prompt through ucm: full prefill plus saving its KV
                times = [self.one(self.prompts.rag(n), salt=f"cold-{n}-{i}-{random.random()}")[0]
                         for i in range(a.cold_reps)]
                self.record("ucm_cold", n, times)

    def host_profile(self) -> None:
        """cProfile (host time, every Python function) over requests at the largest size,
        one profile per ``--host-profile-modes`` entry: where the wall time that no kernel
        accounts for goes.

        ``blend``: ratio 0.15 (the pay policy may run them plain); ``ratio1``: ratio 1.0 (vLLM's
        own prefill under the default policy, after ucm's planning); ``cold``: salted prompts
        that save every block, each after the last one's saves landed; ``cold_chained``:
        the same back to back, as the grid's ``ucm_cold`` cells run (a save still in flight
        competes with the next request)."""
        from ucm.engine.inflight import INFLIGHT

        self.one(self.prompts.rag(max(self.args.chunks)), ratio=0.15)
        for mode in self.args.host_profile_modes:
            _wait_saves(INFLIGHT)  # saves of earlier requests would compete for the GIL
            self._host_profile_mode(mode)

    def _host_profile_mode(self, mode: str) -> None:
        import cProfile
        import io
        import pstats

        from ucm.engine.inflight import INFLIGHT

        n = max(self.args.chunks)
        reps = max(1, self.args.host_profile_reps)
        prof = cProfile.Profile()
        walls = []
        cold = mode.startswith("cold")
        for i in range(reps):
            ids = self.prompts.rag(n)
            prof.enable()
            if cold:  # a salted prompt: no prefix hit, every block saved
                dt, out = self.one(ids, salt=f"hostprof-{i}-{random.random()}")
            else:
                dt, out = self.one(ids, ratio=1.0 if mode == "ratio1" else 0.15)
            prof.disable()
            walls.append((dt, self.stats(out).get("blend_reason", "-")))
            if mode == "cold":  # the next request starts with no save in flight
                _wait_saves(INFLIGHT)
        text = io.StringIO()
        text.write(f"host profile [{self.kind}] {mode}: {reps} requests of {n} chunks; wall under cProfile per "
                   f"request (pay decision): {', '.join(f'{w * 1e3:.1f} ({r})' for w, r in walls)} ms "
                   "(times below are totals over all)\n")
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("ncalls").print_stats(40)
        name = f"hostprofile_{safe(self.kind)}_{mode}"
        prof.dump_stats(str(Path(self.args.work_dir) / f"{name}.pstats"))
        (Path(self.args.work_dir) / f"{name}.txt").write_text(text.getvalue())
        print(text.getvalue()[:12000], flush=True)

    def decode_profile(self) -> None:
        """cProfile (host time per function) over one batch-1 decode of ``--decode-tokens``
        tokens after a RAG prompt (ratio 0.15 on ucm engines): where a decode step's host time
        goes, to compare plain and ucm function by function (``hostprofile_decode_*.pstats``).
        ``kv_transfer_wrapper_calls_per_step`` counts vLLM's per-layer connector wrapper: 0
        when decode steps replay full CUDA graphs, the layer count when they run piecewise."""
        import cProfile
        import io
        import pstats

        ratio = None if self.base in PLAIN_KINDS else 0.15
        chunks = min(self.args.decode_chunks, len(self.prompts.chunks))
        n_tok = self.args.decode_tokens
        self.llm.generate([{"prompt_token_ids": self.prompts.rag(chunks)}], [self.params(ratio, max_tokens=n_tok)],
                          use_tqdm=False)  # warm-up
        import gc

        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        began = [0.0]

        def gc_timer(phase: str, info: dict) -> None:  # a collection stops the engine's thread
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses[info["generation"]].append(time.perf_counter() - began[0])

        def decode_once() -> tuple[list, float]:
            gc.callbacks.append(gc_timer)
            t0 = time.perf_counter()
            try:
                outs = self.llm.generate([{"prompt_token_ids": self.prompts.rag(chunks)}],
                                         [self.params(ratio, max_tokens=n_tok)], use_tqdm=False)
            finally:
                gc.callbacks.remove(gc_timer)
            return outs, time.perf_counter() - t0

        plain_outs, plain_wall = decode_once()  # without cProfile: the GC pauses of a real decode
        gc_entry = {f"gc{g}_count": len(v) for g, v in pauses.items()}
        gc_entry.update({f"gc{g}_ms": round(sum(v) * 1e3, 3) for g, v in pauses.items()})
        gc_entry["gc_tracked_objects"] = len(gc.get_objects())
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        outs = self.llm.generate([{"prompt_token_ids": self.prompts.rag(chunks)}],
                                 [self.params(ratio, max_tokens=n_tok)], use_tqdm=False)
        prof.disable()
        wall = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        wrapper_calls = sum(v[1] for k, v in stats.stats.items()
                            if k[0].endswith("kv_transfer_utils.py") and k[2] == "wrapper")
        entry = {"tokens": n_tok, "ms_per_token": _decode_ms(plain_outs), "wall_s": round(plain_wall, 4), **gc_entry,
                 "wall_s_under_cprofile": round(wall, 4),
                 "ms_per_token_under_cprofile": _decode_ms(outs),
                 "kv_transfer_wrapper_calls_per_step": round(wrapper_calls / n_tok, 2)}
        text = io.StringIO()
        text.write(f"decode host profile [{self.kind}]: {entry}\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
        # What the model runner's forward calls, and everything of ucm and the KV-connector path.
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_callees("_model_forward|execute_model")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats("ucm/|kv_connector|kv_transfer", 40)
        work = Path(self.args.work_dir)
        prof.dump_stats(str(work / f"hostprofile_decode_{safe(self.kind)}.pstats"))
        (work / f"hostprofile_decode_{safe(self.kind)}.txt").write_text(text.getvalue())
        self.results["decode_profile"] = entry
        print(text.getvalue()[:6000], flush=True)

    def profile(self) -> None:
        """torch.profiler over one blend request (largest size, ratio 0.15) and one full prefill."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        from ucm.engine.inflight import INFLIGHT

        n = max(self.args.chunks)
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        out_dir = Path(self.args.work_dir)
        cases = [("blend_0.15", 0.15, None), ("ucm_cold", None, f"prof{random.random()}")]
        if self.args.concurrency:
            cases.append(("throughput_0.15", 0.15, None))
        for label, ratio, salt in cases:
            ids = self.prompts.rag(n)
            # Warm-up of the same kind; a cold one under its own salt, or the profiled
            # request would hit the blocks it saved.
            self.one(self.prompts.rag(n), ratio=ratio, salt=salt and salt + "-warm-up")
            _wait_saves(INFLIGHT)  # earlier saves' copies would land in this profile
            with profile(activities=acts, record_shapes=False) as prof:
                if label.startswith("throughput"):  # --concurrency requests at once, as in throughput()
                    t0 = time.perf_counter()
                    self.llm.generate([{"prompt_token_ids": self.prompts.rag(n)} for _ in range(self.args.concurrency)],
                                      [self.params(ratio)] * self.args.concurrency, use_tqdm=False)
                    dt = time.perf_counter() - t0
                else:
                    dt, _ = self.one(ids, ratio=ratio, salt=salt)
            averages = prof.key_averages()
            table = averages.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
            cpu_table = averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)
            from torch.autograd import DeviceType

            # Device-side events only: a CPU event such as cudaLaunchKernel carries its
            # kernel's time too (the same rule as the profiler's own table total).
            gpu_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in averages
                         if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e3
            text = (f"{label} {n} chunks: wall {dt * 1e3:.1f} ms (under the profiler), GPU time of all kernels and "
                    f"copies {gpu_ms:.1f} ms\n{table}\n\n{cpu_table}\n")
            (out_dir / f"profile_{safe(self.kind)}_{label}.txt").write_text(text)
            print(text[:7000], flush=True)
            if self.args.trace:
                prof.export_chrome_trace(str(out_dir / f"trace_{safe(self.kind)}_{label}.json"))
            del prof
            if torch.cuda.is_available():
                torch.cuda.synchronize()


def engine_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    base = base_kind(args.engine)
    if base not in PLAIN_KINDS:
        os.environ["ENABLE_SPARSE"] = "1"
    if base in ("dram_cudnn", "dram_flex"):
        os.environ["UCM_BLEND_ATTENTION"] = base.split("_")[1]
    if base == "dram_torchload":
        os.environ["UCM_LOAD_KERNEL"] = "torch"
    bench = Bench(args, args.engine)
    bench.results["engine_start_s"] = bench.start_seconds
    bench.results["enforce_eager"] = eager_for(args.engine, args.mode)
    if args.decode_only:  # the decode measurements alone (comparing engine kinds' per-step cost)
        if base not in PLAIN_KINDS:  # the chunks stored, as after the TTFT grid
            chunk_prompts = [{"prompt_token_ids": c} for c in bench.prompts.chunks]
            bench.llm.generate(chunk_prompts, [bench.params()] * len(chunk_prompts), use_tqdm=False)
        if args.decode_batches:
            if base in PLAIN_KINDS:
                bench.decode("decode_full_prefill", None, salted=True)
            else:
                # Also after a prefill ucm runs plain (ratio 1.0 under the default policy):
                # whether decode cost depends on how the request's prefill ran.
                bench.decode_modes([("decode_blend_0.15", 0.15), ("decode_ran_plain", 1.0)], salted=False)
        bench.decode_profile()
    elif base in PLAIN_KINDS:
        bench.run_plain()
    else:
        bench.run_ucm()
    if args.profile and args.engine in args.profile_engines:
        bench.profile()
    if args.host_profile:  # plain too: vLLM's own host time per function, to compare with
        bench.host_profile()
    if args.decode_profile and base in ("plain", "dram") and not args.decode_only:
        bench.decode_profile()
    Path(args.result).write_text(json.dumps(bench.results, indent=1))


# ---------------------------------------------------------------------------------- driver
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, torch_dtype="float32")


def write_model(path: Path, tiny: bool = False, tiny_layers: int = 3, shape: str = "llama8b") -> str:
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TINY, num_hidden_layers=tiny_layers) if tiny else SHAPES[shape]
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return str(path)


def safe(kind: str) -> str:
    """A file-name-safe engine name (engine names are already safe; kept for old result files)."""
    return kind.replace("+", "P")


def run_engine_process(args: argparse.Namespace, kind: str, out_dir: Path, extra: list[str]) -> dict:
    result = out_dir / f"result_{safe(kind)}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", kind, "--result", str(result)] + extra
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.time()
    log = open(out_dir / f"log_{safe(kind)}.txt", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        if line.startswith("[") or "Traceback" in line or "Error" in line or "ucm bench" in line:
            print(line, end="", flush=True)
    proc.wait()
    log.close()
    print(f"engine {kind}: exit {proc.returncode} after {time.time() - t0:.0f}s", flush=True)
    if proc.returncode != 0 or not result.exists():
        tail = (out_dir / f"log_{safe(kind)}.txt").read_text()[-4000:]
        print(tail, flush=True)
        return {"kind": kind, "error": f"exit {proc.returncode}", "modes": {}, "throughput": {}}
    return json.loads(result.read_text())


# Engine kind -> prefix of its modes in the merged table.
PREFIX = {"plain": "", "dram": "", "plain_eager": "eager_", "dram_eager": "eager_", "dram_b64": "b64_", "dram_whole": "whole_", "dram_torchload": "torchload_",
          "dram_cudnn": "cudnn_", "dram_flex": "flex_", "dram_nodefer": "nodefer_", "file": "file_",
          "epic": "epic_", "prefix": "prefix_", "noop": "noop_", "plain_again": "again_", "dram_again": "dramagain_", "dram_nativeops": "nativeops_"}
MODE_ORDER = ["full_prefill", "eager_full_prefill", "prefix_hit", "eager_prefix_hit", "blend_0", "blend_0.05", "blend_0.15", "blend_0.3", "blend_1",
              "b64_blend_0", "b64_blend_0.15", "nodefer_blend_0", "nodefer_blend_0.15", "file_blend_0",
              "file_blend_0.15", "eager_blend_0", "eager_blend_0.15", "ucm_cold", "eager_ucm_cold"]


def ordered_modes(table: dict[str, dict[str, dict]], sizes: list[str]) -> list[str]:
    """The modes present at any size: MODE_ORDER's first, then others (EPIC's k) sorted."""
    present = {m for n in sizes for m in table[n]}
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))


def merge(results: list[dict]) -> dict:
    table: dict[str, dict[str, dict]] = {}
    tput: dict[str, dict[str, dict]] = {}
    decode: dict[str, dict[str, dict]] = {}
    for res in results:
        prefix = PREFIX.get(res.get("kind"), "")
        for n, modes in res.get("modes", {}).items():
            for mode, entry in modes.items():
                table.setdefault(n, {})[prefix + mode] = entry
        for n, modes in res.get("throughput", {}).items():
            for mode, entry in modes.items():
                tput.setdefault(n, {})[prefix + mode] = entry
        for b, modes in res.get("decode", {}).items():
            for mode, entry in modes.items():
                decode.setdefault(b, {})[prefix + mode] = entry
    return {"ttft": table, "throughput": tput, "decode": decode}


def render(merged: dict, meta: dict) -> str:
    lines = []
    table = merged["ttft"]
    sizes = sorted(table, key=int)
    modes = ordered_modes(table, sizes)
    modes += sorted({m for n in sizes for m in table[n]} - set(modes))
    lines.append("| mode | " + " | ".join(f"{n}×512 (~{int(n) * CHUNK + SYSTEM + QUESTION} tok) ms, × vs full"
                                          for n in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for m in modes:
        cells = []
        for n in sizes:
            e = table[n].get(m)
            full = table[n].get("full_prefill", {}).get("median_ms")
            if e is None:
                cells.append("")
                continue
            speed = f" ({full / e['median_ms']:.2f}×)" if full else ""
            extra = ""
            if e.get("recompute_ratio") is not None:
                extra = f", rc {e['recompute_ratio']:.2f}"
            cells.append(f"{e['median_ms']:.1f}{speed}{extra}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if merged["throughput"]:
        lines.append("")
        lines.append(f"Throughput, {meta.get('concurrency')} concurrent requests "
                     f"(max_tokens={meta.get('tput_max_tokens', 1)}):")
        lines.append("")
        lines.append("| chunks | mode | req/s | mean TTFT ms | wall s | decode ms/token |")
        lines.append("|---|---|---|---|---|---|")
        for n in sorted(merged["throughput"], key=int):
            for m, e in merged["throughput"][n].items():
                lines.append(f"| {n} | {m} | {e['req_per_s']} | {e['mean_ttft_ms']} | {e['wall_s']} | "
                             f"{e.get('decode_ms_per_token', '')} |")
    if merged.get("decode"):
        lines.append("")
        lines.append("Decode, ms per output token (median over requests):")
        lines.append("")
        lines.append("| batch | mode | ms/token | min | max | context chunks |")
        lines.append("|---|---|---|---|---|---|")
        for b in sorted(merged["decode"], key=int):
            for m, e in merged["decode"][b].items():
                lines.append(f"| {b} | {m} | {e['ms_per_token']} | {e['ms_per_token_min']} | "
                             f"{e['ms_per_token_max']} | {e['context_chunks']} |")
    return "\n".join(lines)


def plot(merged: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = merged["ttft"]
    sizes = sorted(table, key=int)
    modes = [m for m in ordered_modes(table, sizes) if "ucm_cold" not in m]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        xs = [j + i * width for j in range(len(sizes))]
        ys = [table[n].get(m, {}).get("median_ms", 0) for n in sizes]
        bars = ax.bar(xs, ys, width, label=m, color=plt.cm.tab20(i % 20))
        for x, y, n in zip(xs, ys, sizes):
            full = table[n].get("full_prefill", {}).get("median_ms")
            if y and full:
                ax.text(x, y, f"{full / y:.1f}×", ha="center", va="bottom", fontsize=7)
        del bars
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{n}×512 chunks\n(~{int(n) * CHUNK + SYSTEM + QUESTION} tokens)" for n in sizes])
    ax.set_ylabel("median TTFT (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def driver(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.real_model or write_model(Path(args.model_dir), tiny=args.tiny, tiny_layers=args.tiny_layers,
                                                shape=args.shape)
    if "file" in args.engines:
        import shutil

        shutil.rmtree(args.file_dir, ignore_errors=True)
    common = ["--model-dir", model_dir, "--out-dir", str(out_dir), "--work-dir", str(work_dir), "--chunks", *map(str, args.chunks),
              "--reps", str(args.reps), "--ratios", *map(str, args.ratios), "--file-ratios",
              *map(str, args.file_ratios), "--concurrency", str(args.concurrency), "--max-model-len",
              str(args.max_model_len), "--max-batched-tokens", str(args.max_batched_tokens), "--gpu-mem",
              str(args.gpu_mem), "--block-tokens", str(args.block_tokens), "--check-layer", str(args.check_layer),
              "--file-dir", args.file_dir, *(["--dram-gib", str(args.dram_gib)] if args.dram_gib else []), "--tp", str(args.tp),
              "--cold-reps", str(args.cold_reps), "--warmup-rounds", str(args.warmup_rounds), "--seed", str(args.seed),
              "--io-threads", str(args.io_threads), "--dtype", args.dtype, "--mode", args.mode,
              "--tput-max-tokens", str(args.tput_max_tokens), "--decode-tokens", str(args.decode_tokens),
              "--decode-chunks", str(args.decode_chunks), "--decode-reps", str(args.decode_reps),
              "--epic-ks", *map(str, args.epic_ks)]
    if args.tput_chunks:
        common += ["--tput-chunks", *map(str, args.tput_chunks)]
    if args.decode_batches:
        common += ["--decode-batches", *map(str, args.decode_batches)]
    if args.load_group is not None:
        common += ["--load-group", str(args.load_group)]
    if args.real_model:
        common += ["--real-model", args.real_model]
    if args.pay_policy:
        common += ["--pay-policy", args.pay_policy]
    common += ["--engines", *args.engines, "--b64-ratios", *map(str, args.b64_ratios),
               "--profile-engines", *args.profile_engines]
    if args.profile:
        common.append("--profile")
    if args.trace:
        common.append("--trace")
    if args.host_profile:
        common += ["--host-profile", "--host-profile-reps", str(args.host_profile_reps),
                   "--host-profile-modes", *args.host_profile_modes]
    if args.host_times:
        common.append("--host-times")
    if args.decode_profile:
        common.append("--decode-profile")
    if args.decode_only:
        common.append("--decode-only")
    if args.file_cold:
        common.append("--file-cold")
    common += ["--scheduling", args.scheduling]
    if args.pool is not None:
        common += ["--pool", str(args.pool)]
    results = []
    for kind in args.engines:
        results.append(run_engine_process(args, kind, work_dir, common))
        finish(results, args, out_dir)  # after every engine: a cut-off run still leaves its numbers
    import tarfile

    with tarfile.open(out_dir / "extras.tgz", "w:gz") as tar:  # logs and profiles, one file
        tar.add(work_dir, arcname="ttft_work")


def finish(results: list[dict], args: argparse.Namespace, out_dir: Path) -> None:
    import datetime

    merged = merge(results)
    meta = {"date": datetime.date.today().isoformat(), "concurrency": args.concurrency,
            "tput_max_tokens": args.tput_max_tokens, "scheduling": args.scheduling, "mode": args.mode,
            "pay_policy": args.pay_policy or "ucm default (auto)",
            "enforce_eager": {r.get("kind"): r.get("enforce_eager") for r in results},
            "argv": " ".join(sys.argv), "engines": {r.get("kind"): {k: r.get(k) for k in
                                                                 ("engine_start_s", "precompute_s", "error")}
                                                    for r in results}}
    try:
        import torch
        import vllm

        meta.update(gpu=torch.cuda.get_device_name(0), vllm=vllm.__version__, torch=torch.__version__)
    except Exception:  # noqa: BLE001
        pass
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    full = {"meta": meta, "results": results, **merged}
    (out_dir / f"{args.name}.json").write_text(json.dumps(full, indent=1))
    text = render(merged, meta)
    (out_dir / f"{args.name}.md").write_text(text + "\n")
    print(json.dumps(meta, indent=1))
    print(text)
    try:
        plot(merged, out_dir / f"{args.name}.png", f"Blend TTFT, {args.model_label}, {meta.get('gpu', '')}, "
                                                 f"vLLM {meta.get('vllm', '')}, {args.mode} mode")
    except Exception as exc:  # noqa: BLE001
        print("plot failed:", exc)


def build_parser() -> argparse.ArgumentParser:
    """Every option of this benchmark (benchmarks/paired_ttft.py builds its engines from them too)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["plain", "dram", "dram_b64", "file"],
                    choices=sorted(PREFIX),
                    help="plain: vLLM alone (plain_again: the same in a second process); dram/file: ucm with a host-memory / file store; "
                         "dram_b64: host-memory store with 64-token ucm blocks; dram_whole: host-memory "
                         "store, chunk loads as whole blocks (no layer groups); dram_torchload: the same "
                         "written by per-layer torch ops instead of the Triton load kernel; dram_cudnn / "
                         "dram_flex: host-memory store, exact-mask attention by cuDNN / FlexAttention over "
                         "a gathered context instead of the paged Triton kernel; dram_nodefer: chunk loads "
                         "issued before the forward (engine_options.defer_chunk_loads off); dram_nativeops: Blend steps "
                         "keep vLLM's native custom-op code (engine_options.eager_kernels off)")
    ap.add_argument("--chunks", nargs="+", type=int, default=[6, 8, 16], help="chunks of 512 tokens per prompt")
    ap.add_argument("--pool", type=int, default=None, help="chunks in the pool (default: max --chunks)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.05, 0.15, 0.3, 1.0])
    ap.add_argument("--file-ratios", nargs="+", type=float, default=[0.0, 0.15])
    ap.add_argument("--b64-ratios", nargs="+", type=float, default=[0.0, 0.15],
                    help="ratios for the 'dram_b64' engine (--ratios is for 'dram')")
    ap.add_argument("--profile-engines", nargs="*", default=["dram"])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tput-max-tokens", type=int, default=1, help="new tokens per throughput request")
    ap.add_argument("--tput-chunks", nargs="*", type=int, default=None,
                    help="prompt sizes (chunks) of the throughput runs (default: every --chunks)")
    ap.add_argument("--mode", choices=["default", "eager"], default="default",
                    help="default: vLLM's default mode (torch.compile + CUDA graphs) in every engine; eager: "
                         "enforce_eager=True in every engine (kinds ending in _eager are eager in both)")
    ap.add_argument("--decode-batches", nargs="*", type=int, default=[],
                    help="measure decode ms/token at these batch sizes (e.g. 1 32)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-chunks", type=int, default=8, help="RAG prompt size (chunks) before the decode")
    ap.add_argument("--decode-reps", type=int, default=2, help="timed repeats per batch size (after one warm-up)")
    ap.add_argument("--pay-policy", choices=["auto", "always"], default=None,
                    help="Blend.pay_policy of the ucm engines (default: ucm's own, auto)")
    ap.add_argument("--name", default="ttft_gpu", help="stem of the result files in --out-dir")
    ap.add_argument("--real-model", default=None,
                    help="a model directory with real weights (load_format auto) instead of the dummy 8B shape")
    ap.add_argument("--model-label", default="Llama-3-8B shape (dummy bf16)", help="model name in the plot title")
    ap.add_argument("--cold-reps", type=int, default=3)
    ap.add_argument("--warmup-rounds", type=int, default=3,
                    help="warm-up rounds over every size and ratio 0/0.15 before timing ucm engines")
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--max-batched-tokens", type=int, default=32768)
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--check-layer", type=int, default=1)
    ap.add_argument("--load-group", type=int, default=None,
                    help="engine_options.load_layer_group for the ucm engines (default: ucm's own)")
    ap.add_argument("--dram-gib", type=int, default=None,
                    help="host-memory tier capacity (pinned at engine start); default 8, and with --tiny (a CPU "
                         "run, where vLLM's KV cache leaves ~1.5 GiB of a 24 GiB host) the store's own default, "
                         "fitted to the host")
    ap.add_argument("--file-dir", default="/var/tmp/ucm_ttft_kv")
    ap.add_argument("--file-cold", action="store_true")
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--scheduling", choices=["async", "sync"], default="async",
                    help="vLLM's scheduling in every engine: async (vLLM 0.26's default on CUDA: the next step's "
                         "host work overlaps this step's GPU work) or sync (the earlier sessions' runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b",
                    help="the dummy model's config: Llama-3-8B or Qwen2.5-Coder-0.5B (use its own --model-dir)")
    ap.add_argument("--epic-ks", nargs="+", type=int, default=[16],
                    help="EPIC engine: tokens recomputed at the start of each reused chunk (k); the first is the config's")
    ap.add_argument("--out-dir", default="ttft_out", help="results: ttft_gpu.json/.md/.png, extras.tgz")
    ap.add_argument("--work-dir", default="/tmp/ttft_work", help="per-engine results, logs, profiles")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same vocabulary (CPU smoke test)")
    ap.add_argument("--tiny-layers", type=int, default=3, help="layers of the --tiny model (32: the 8B's depth)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile blend_0.15 requests at the largest size (ucm engines): host time per function")
    ap.add_argument("--decode-only", action="store_true",
                    help="per engine only the decode measurements and the decode host profile (no TTFT grid)")
    ap.add_argument("--decode-profile", action="store_true",
                    help="cProfile one batch-1 decode (plain and dram engines): host time per function")
    ap.add_argument("--host-profile-reps", type=int, default=3)
    ap.add_argument("--host-profile-modes", nargs="+", default=["blend"], choices=["blend", "ratio1", "cold", "cold_chained"],
                    help="what --host-profile profiles, one profile each: blend (ratio 0.15 requests), ratio1 (ratio 1.0), cold "
                         "(salted prompts saving every block, each after the last one's saves landed), "
                         "cold_chained (the same back to back)")
    ap.add_argument("--host-times", action="store_true",
                    help="record ucm's host time per phase (plan, load, forward, ...) of every timed request")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--plot-only", default=None, help="a saved ttft_gpu.json: redraw table and plot")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.dram_gib is None and not args.tiny and not args.engine:  # an engine gets the driver's choice
        args.dram_gib = 8
    if args.plot_only:
        saved = json.loads(Path(args.plot_only).read_text())
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        merged = {"ttft": saved["ttft"], "throughput": saved["throughput"]}
        print(render(merged, saved["meta"]))
        m = saved["meta"]
        plot(merged, out_dir / f"{args.name}.png",
             f"Blend TTFT, {args.model_label}, {m.get('gpu', '')}, vLLM {m.get('vllm', '')}, {m.get('mode', 'eager')} mode")
        return
    if args.engine:
        engine_main(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
