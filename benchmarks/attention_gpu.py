"""Exact-mask attention of Blend's selected rows vs the approximate FlashAttention call.

After the check layer Blend computes only the selected rows (a few % of a request), each
attending over the whole context with the exact causal mask by position. Other systems
call FlashAttention bottom-right aligned instead (the nq queries treated as the last nq
tokens), which is approximate. Target: the best exact backend within 1.3x of that call.

Per configuration (Llama-3-8B layer: 32 query heads, 8 KV heads, head_dim 128, bf16;
context 4K/8K/16K; selected fraction 0.05/0.15/0.3 of uniform random positions, plus
"last": all selected rows in the last chunk):

* ``flash_br``: approximate baseline, FlashAttention with a bottom-right causal mask
  (``vllm.vllm_flash_attn.flash_attn_varlen_func`` if importable, else torch's FA2 op,
  KV heads expanded beforehand if it refuses GQA; see ``baseline`` in the JSON).
* ``flex``, ``cudnn``, ``sdpa``: ``ExactMaskAttention`` with that backend, the plan
  prepared once (its cost reported apart, as ``prepare_ms``; flex's first call, which
  compiles, as ``first_call_s``). Each is checked against the sdpa reference. ``auto``:
  what serving gets over a gathered context (``backend_used`` says which).
* ``triton``: the paged kernel (``ucm.sparse.blend.paged_attention``), K/V in a paged cache
  of 16-token blocks in shuffled order, read through the block table (what serving
  runs on CUDA; no gather).

Times: CUDA events, L2 flushed before each call, median of ``--reps`` after warm-up.
Each backend runs in its own try/except; an error is reported, never fatal::

    python benchmarks/attention_gpu.py --out $OUT/attention_gpu.json
    python benchmarks/attention_gpu.py --smoke      # CPU, tiny shapes: proves it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ucm.sparse.blend import attention as attn  # noqa: E402
from ucm.sparse.blend import flex_mask  # noqa: E402

EXACT = ("auto", "triton", "flex", "cudnn", "sdpa")
TOL = 2e-2  # relative error (norm) vs the reference, bf16


# ------------------------------------------------------------------------- timing
class Timer:
    """Median time of a call: GPU time by CUDA events on GPU, wall time on CPU.

    On GPU each timed call starts with cold L2 (a 256 MB write, more than the H100's
    50 MB L2, as a layer of a real forward sees its K/V) and with the host ahead of the
    GPU (a short spin kernel queued before the start event): in a GPU-bound prefill
    the host runs ahead, so host launch overhead would otherwise be timed as GPU idle.
    That overhead is reported on its own by :meth:`host`.
    """

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                self.flush.zero_()
                torch.cuda._sleep(2_000_000)  # ~1 ms: the host queues fn meanwhile
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def host(self, fn: Callable[[], Any], n: int = 20) -> Optional[float]:
        """Host time to issue one call (ms), the GPU kept busy so nothing blocks."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / n
        torch.cuda.synchronize()
        return round(ms, 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median host-side time of a call including its GPU work (for prepare costs)."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def relerr(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


# ---------------------------------------------------------------------- workloads
def make_case(nk: int, frac: str, hq: int, hkv: int, d: int, dtype: torch.dtype,
              device: torch.device, seed: int) -> dict:
    """Random layer inputs; q_pos a sorted uniform subset, or the last nq positions."""
    g = torch.Generator().manual_seed(seed)
    f = 0.15 if frac == "last" else float(frac)
    nq = max(1, round(f * nk))
    if frac == "last":
        q_pos = torch.arange(nk - nq, nk)
    else:
        q_pos = torch.randperm(nk, generator=g)[:nq].sort().values
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return {"q": mk(nq, hq, d), "k": mk(nk, hkv, d), "v": mk(nk, hkv, d),
            "q_pos": q_pos.to(device), "k_pos": torch.arange(nk, device=device),
            "scale": d ** -0.5, "nq": nq, "nk": nk}


def pair_counts(q_pos: torch.Tensor, nk: int) -> dict:
    """Query-key pairs computed by the exact mask vs the bottom-right approximation."""
    nq = q_pos.numel()
    exact = int((q_pos.long() + 1).sum())
    br = sum(min(nk, nk - nq + i + 1) for i in range(nq))
    return {"pairs_exact_vs_bottom_right": round(exact / br, 3)}


# ------------------------------------------------------------------------ baseline
def flash_bottom_right(case: dict, device: torch.device) -> tuple[Callable[[], Any], str]:
    """The approximate call other systems make, in its fastest available form."""
    q, k, v, scale = case["q"], case["k"], case["v"], case["scale"]
    nq, nk = case["nq"], case["nk"]
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        cu_q = torch.tensor([0, nq], device=device, dtype=torch.int32)
        cu_k = torch.tensor([0, nk], device=device, dtype=torch.int32)
        fn = lambda: flash_attn_varlen_func(q, k, v, max_seqlen_q=nq, cu_seqlens_q=cu_q,  # noqa: E731
                                            max_seqlen_k=nk, cu_seqlens_k=cu_k,
                                            softmax_scale=scale, causal=True)
        fn()
        return fn, "vllm.vllm_flash_attn.flash_attn_varlen_func(causal=True)"
    except Exception:  # noqa: BLE001 - not installed here; use torch's FlashAttention
        pass
    if device.type != "cuda":  # smoke: the same mask through SDPA
        from torch.nn.attention.bias import causal_lower_right

        rep = q.shape[1] // k.shape[1]
        kk, vv = (t.repeat_interleave(rep, 1).transpose(0, 1)[None] for t in (k, v))
        bias = causal_lower_right(nq, nk)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.transpose(0, 1)[None], kk, vv, attn_mask=bias, scale=scale)
        fn()
        return fn, "sdpa(causal_lower_right), CPU"
    qq = q.transpose(0, 1)[None]
    try:
        kk, vv = (t.transpose(0, 1)[None] for t in (k, v))
        fn = lambda: torch.ops.aten._scaled_dot_product_flash_attention(  # noqa: E731
            qq, kk, vv, 0.0, is_causal=True, scale=scale)[0]
        fn()
        label = "torch aten._scaled_dot_product_flash_attention (FA2), bottom-right causal, GQA"
    except Exception as exc:  # noqa: BLE001
        rep = q.shape[1] // k.shape[1]
        kk, vv = (t.repeat_interleave(rep, 1).transpose(0, 1)[None] for t in (k, v))
        fn = lambda: torch.ops.aten._scaled_dot_product_flash_attention(  # noqa: E731
            qq, kk, vv, 0.0, is_causal=True, scale=scale)[0]
        fn()
        label = (f"torch aten._scaled_dot_product_flash_attention (FA2), bottom-right causal, "
                 f"KV heads pre-expanded (GQA refused: {type(exc).__name__})")
    return fn, label


def check_bottom_right(case: dict, fn: Callable[[], Any]) -> float:
    """The baseline really is the bottom-right mask: compare with an explicit one."""
    q, k, v, nq, nk = case["q"], case["k"], case["v"], case["nq"], case["nk"]
    out = fn()
    out = out[0].transpose(0, 1) if out.dim() == 4 else out
    mask = attn.position_mask(torch.arange(nk - nq, nk, device=q.device), case["k_pos"])
    ref = attn._sdpa_reference(q, k, v, mask, case["scale"])
    return relerr(out, ref)


# -------------------------------------------------------------------------- exact
def paged_cache(k: torch.Tensor, v: torch.Tensor, block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[nk, H, D]`` (key j = token j) in a ``[2, blocks, block_size, H, D]`` cache,
    blocks in shuffled order; returns (cache, block_table)."""
    nk = k.shape[0]
    blocks = (nk + block_size - 1) // block_size
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).to(k.device)
    cache = k.new_zeros((2, blocks, block_size) + tuple(k.shape[1:]))
    keys = torch.arange(nk, device=k.device)
    cache[0, table[keys // block_size], keys % block_size] = k
    cache[1, table[keys // block_size], keys % block_size] = v
    return cache, table


def run_paged(case: dict, timer: Timer, ref: Optional[torch.Tensor], block_size: int = 16,
              **launch: int) -> dict:
    """Time the paged kernel (``triton``): K/V placed in a paged cache of ``block_size``-token
    blocks in shuffled order, read through the block table as in a forward. ``launch``:
    tile/warp settings of :func:`paged_attention` (backend ``triton:block_n=128+num_warps=8``)."""
    from ucm.sparse.blend.paged_attention import paged_attention

    cache, table = paged_cache(case["k"], case["v"], block_size)
    k, nk = case["k"], case["nk"]
    call = lambda: paged_attention(case["q"], case["q_pos"], cache[0], cache[1], table, nk,  # noqa: E731
                                   case["scale"], **launch)
    t0 = time.perf_counter()
    out = call()
    sync(k.device)
    res: dict[str, Any] = {"first_call_s": round(time.perf_counter() - t0, 3), "ms": round(timer(call), 4),
                           "host_ms": timer.host(call)}
    if ref is not None:
        res["relerr_vs_ref"] = relerr(out, ref)
        res["ok"] = res["relerr_vs_ref"] <= TOL
    return res


def run_batch(spec: str, args: argparse.Namespace, device: torch.device, timer: Timer, dtype: torch.dtype) -> dict:
    """A step of several requests (``spec`` = "4x8192/0.15"): their selected rows
    through the paged kernel one launch per request with programs in row order (the
    engine's earlier ordering), one launch per request heaviest
    program first, and one launch for the whole batch (what the engine runs now). All
    three use the same tiles and launch plans built before the timing. Every output is
    checked against the per-request reference."""
    from ucm.sparse.blend.paged_attention import PagedBatch, launch_tiles, paged_attention, paged_attention_batch

    count, _, rest = spec.partition("x")
    nk, _, frac = rest.partition("/")
    cases = [make_case(int(nk), frac, args.hq, args.hkv, args.d, dtype, device, seed=500 + i)
             for i in range(int(count))]
    caches = [paged_cache(c["k"], c["v"]) for c in cases]
    # one shared cache as in the engine: request i's blocks follow request i-1's
    blocks = caches[0][0].shape[1]
    cache = torch.cat([c[0] for c in caches], dim=1)
    tables = torch.stack([c[1] + i * blocks for i, c in enumerate(caches)]).to(torch.int32)
    q = torch.cat([c["q"] for c in cases])
    q_pos = torch.cat([c["q_pos"] for c in cases])
    rows = [c["nq"] for c in cases]
    scale = cases[0]["scale"]
    group = args.hq // args.hkv
    batch = PagedBatch.build(tables, [c["nk"] for c in cases], rows, group)
    starts = [sum(rows[:i]) for i in range(len(rows))]

    block_n, num_stages = launch_tiles(q)

    def per_request(heaviest_first: bool) -> Callable[[], Any]:
        plans = [PagedBatch.build(tables[i:i + 1], [c["nk"]], [c["nq"]], group, heaviest_first=heaviest_first)
                 for i, c in enumerate(cases)]

        def call() -> None:
            for c, plan in zip(cases, plans):
                paged_attention_batch(c["q"], c["q_pos"], cache[0], cache[1], plan, scale,
                                      block_n=block_n, num_stages=num_stages)
        return call

    variants = {"per_request_in_order": per_request(False), "per_request_heaviest_first": per_request(True),
                "one_launch": lambda: paged_attention_batch(q, q_pos, cache[0], cache[1], batch, scale,
                                                            block_n=block_n, num_stages=num_stages)}
    res: dict[str, Any] = {"spec": spec, "rows": rows, "tiles": [block_n, num_stages]}
    out = paged_attention_batch(q, q_pos, cache[0], cache[1], batch, scale)
    errs = []
    for i, c in enumerate(cases):
        ref = attn.causal_attention_by_position(c["q"], c["q_pos"], c["k"], c["v"], c["k_pos"], scale,
                                                backend="sdpa")
        errs.append(relerr(out[starts[i]:starts[i] + rows[i]], ref))
        one = paged_attention(c["q"], c["q_pos"], cache[0], cache[1], tables[i], c["nk"], scale, heaviest_first=False)
        errs.append(relerr(one, ref))
    res["max_relerr_vs_ref"] = max(errs)
    res["ok"] = res["max_relerr_vs_ref"] <= TOL
    for name, fn in variants.items():
        res[name] = {"ms": round(timer(fn), 4), "host_ms": timer.host(fn)}
    base = res["per_request_in_order"]["ms"]
    for name in variants:
        res[name]["speedup_vs_in_order"] = round(base / res[name]["ms"], 3)
    return res


def run_exact(name: str, case: dict, device: torch.device, timer: Timer, ref: Optional[torch.Tensor],
              compile_flex: Optional[bool]) -> dict:
    """Time one ExactMaskAttention backend; report a fallback or mismatch as an error."""
    if name.startswith("triton"):
        launch = dict(item.split("=") for item in name.partition(":")[2].split("+") if item)
        return run_paged(case, timer, ref, **{key: int(value) for key, value in launch.items()})
    hq, hkv = case["q"].shape[1], case["k"].shape[1]
    prep = lambda: attn.ExactMaskAttention.prepare(  # noqa: E731
        case["q_pos"], case["k_pos"], hq, hkv, device, backend=name, compile_flex=compile_flex)
    res: dict[str, Any] = {}
    if name in attn._BROKEN:
        return {"error": f"given up earlier: {attn._BROKEN[name]}"}
    plan = prep()
    call = lambda: plan(case["q"], case["k"], case["v"], case["scale"])  # noqa: E731
    sync(device)
    t0 = time.perf_counter()
    out = call()
    sync(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)
    res["backend_used"] = plan.backend
    if plan.backend != name and name != "auto":
        return {"error": f"fell back to {plan.backend}: {attn._BROKEN.get(name, '?')}"}
    res["prepare_ms"] = round(wall_ms(prep, device), 3)
    res["ms"] = round(timer(call), 4)
    res["host_ms"] = timer.host(call)
    if plan.backend != res["backend_used"]:
        return {"error": f"fell back to {plan.backend} while timing: {attn._BROKEN.get(name, '?')}"}
    if ref is not None:
        res["relerr_vs_ref"] = relerr(out, ref)
        res["ok"] = res["relerr_vs_ref"] <= TOL
    return res


FLEX_VARIANTS: dict[str, tuple[dict, Optional[dict]]] = {
    "flex_static": ({"dynamic": False}, None),
    "flex_m128n64w8": ({"dynamic": True}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
    "flex_m64n64": ({"dynamic": True}, {"BLOCK_M": 64, "BLOCK_N": 64}),
}
"""Other ways to compile and launch flex, to see what the plan's choice leaves on the
table (``--flex-variants``): a static-shape compile, other kernel tile sizes."""
_VARIANT_FNS: dict[str, Callable[..., Any]] = {}


def run_flex_variant(name: str, case: dict, timer: Timer, ref: Optional[torch.Tensor]) -> dict:
    """Time flex_attention compiled/launched another way, with the plan's block mask."""
    from torch.nn.attention.flex_attention import flex_attention

    compile_kw, kernel_options = FLEX_VARIANTS[name]
    fn = _VARIANT_FNS.get(name)
    if fn is None:
        fn = _VARIANT_FNS[name] = torch.compile(flex_attention, fullgraph=True, **compile_kw)
    q, k, v, nq = case["q"], case["k"], case["v"], case["nq"]
    bm = flex_mask.build_block_mask(case["q_pos"], case["k_pos"])
    qp = q.new_zeros((bm.seq_lengths[0],) + tuple(q.shape[1:]))
    qp[:nq] = q
    extra = {"kernel_options": kernel_options} if kernel_options else {}
    call = lambda: fn(qp.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # noqa: E731
                      block_mask=bm, scale=case["scale"], enable_gqa=q.shape[1] != k.shape[1], **extra)
    t0 = time.perf_counter()
    out = call()[0, :, :nq].transpose(0, 1)
    res: dict[str, Any] = {"first_call_s": round(time.perf_counter() - t0, 3), "ms": round(timer(call), 4)}
    if ref is not None:
        res["relerr_vs_ref"] = relerr(out, ref)
        res["ok"] = res["relerr_vs_ref"] <= TOL
    return res


def guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report, go on with the next backend
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}


def run_config(nk: int, frac: str, args: argparse.Namespace, device: torch.device, timer: Timer,
               dtype: torch.dtype, seed: int) -> dict:
    case = make_case(nk, frac, args.hq, args.hkv, args.d, dtype, device, seed)
    row: dict[str, Any] = {"nk": nk, "frac": frac, "nq": case["nq"], **pair_counts(case["q_pos"].cpu(), nk)}

    def baseline() -> dict:
        fn, label = flash_bottom_right(case, device)
        res = {"ms": round(timer(fn), 4), "host_ms": timer.host(fn), "impl": label}
        res["relerr_vs_bottom_right_mask"] = check_bottom_right(case, fn)
        return res

    row["flash_br"] = guarded(baseline)
    ref = None
    try:
        ref = attn.causal_attention_by_position(case["q"], case["q_pos"], case["k"], case["v"],
                                                case["k_pos"], case["scale"], backend="sdpa")
    except Exception as exc:  # noqa: BLE001
        row["reference_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for name in args.backends:
        row[name] = guarded(lambda: run_exact(name, case, device, timer, ref, args.compile_flex))
    if f"{nk}/{frac}" in args.variant_configs:
        for name in args.flex_variants:
            row[name] = guarded(lambda: run_flex_variant(name, case, timer, ref))
    base = row["flash_br"].get("ms")
    for name in [*args.backends, *args.flex_variants]:
        if name not in row:
            row[name] = {"skipped": "not run for this configuration"}
        if base and "ms" in row[name]:
            row[name]["ratio_to_flash_br"] = round(row[name]["ms"] / base, 3)
    del case, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def odd_shape_checks(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Correctness only, on shapes the timed grid lacks: nk and nq not multiples of 128,
    unsorted queries, permuted keys, GQA 4:1 and 1:1."""
    out = {}
    for nk, nq, hkv, shuffle_q, perm_k in ((3001, 457, args.hkv, True, False),
                                           (2049, 130, args.hq, False, True),
                                           (777, 777, args.hkv, True, True)):
        g = torch.Generator().manual_seed(nk)
        q_pos = torch.randperm(nk, generator=g)[:nq]
        if not shuffle_q:
            q_pos = q_pos.sort().values
        k_pos = torch.randperm(nk, generator=g) if perm_k else torch.arange(nk)
        q = torch.randn(nq, args.hq, args.d, generator=g).to(device, dtype)
        k = torch.randn(nk, hkv, args.d, generator=g).to(device, dtype)
        v = torch.randn(nk, hkv, args.d, generator=g).to(device, dtype)
        q_pos, k_pos = q_pos.to(device), k_pos.to(device)
        key = f"nk{nk}_nq{nq}_hkv{hkv}_shufq{int(shuffle_q)}_permk{int(perm_k)}"
        ref = attn.causal_attention_by_position(q.float(), q_pos, k.float(), v.float(), k_pos,
                                                args.d ** -0.5, backend="sdpa")
        res = {}
        for name in args.backends:
            if name.startswith("triton"):
                if perm_k or name != "triton":  # a paged cache holds keys in token order
                    continue

                def paged() -> dict:
                    from ucm.sparse.blend.paged_attention import paged_attention

                    cache, table = paged_cache(k, v)
                    err = relerr(paged_attention(q, q_pos, cache[0], cache[1], table, nk, args.d ** -0.5), ref)
                    return {"relerr_vs_fp32_ref": err, "ok": err <= TOL}
                res[name] = guarded(paged)
                continue

            def one() -> dict:
                plan = attn.ExactMaskAttention.prepare(q_pos, k_pos, args.hq, hkv, device, backend=name,
                                                       compile_flex=args.compile_flex)
                err = relerr(plan(q, k, v, args.d ** -0.5), ref)
                return {"backend_used": plan.backend, "relerr_vs_fp32_ref": err,
                        "ok": name in ("auto", plan.backend) and err <= TOL}
            res[name] = guarded(one)
        out[key] = res
    return out


# --------------------------------------------------------------------------- report
def print_table(rows: list[dict], backends: list[str]) -> None:
    head = f"{'ctx':>6} {'frac':>5} {'nq':>5} {'pairs':>5} {'flash_br ms':>11}"
    for name in backends:
        head += f" {name + ' ms':>10} {'x':>5}"
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['nk']:>6} {r['frac']:>5} {r['nq']:>5} {r['pairs_exact_vs_bottom_right']:>5.2f} "
                f"{_fmt(r['flash_br'].get('ms')):>11}")
        for name in backends:
            line += f" {_fmt(r[name].get('ms')):>10} {_fmt(r[name].get('ratio_to_flash_br'), 2):>5}"
        print(line)
    print("pairs: exact-mask query-key pairs / bottom-right pairs; x: time / flash_br time")
    for r in rows:
        for name in ["flash_br", *backends]:
            if "error" in r[name] or r[name].get("ok") is False:
                print(f"  {r['nk']}/{r['frac']} {name}: {r[name]}")


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "ERR" if x is None else f"{x:.{nd}f}"


def summary(rows: list[dict], backends: list[str], target: float) -> dict:
    """Best exact backend per config and whether it meets the target ratio."""
    best = {}
    for r in rows:
        ok = [(r[b]["ratio_to_flash_br"], b) for b in backends
              if "ratio_to_flash_br" in r[b] and r[b].get("ok", True)]
        if ok:
            ratio, name = min(ok)
            best[f"{r['nk']}/{r['frac']}"] = {"backend": name, "ratio": ratio, "meets_target": ratio <= target}
    return {"target_ratio": target, "best": best,
            "all_meet_target": bool(best) and all(v["meets_target"] for v in best.values())}


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = repr(exc)[:100]
    return env


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, sdpa and eager flex only")
    p.add_argument("--contexts", default="4096,8192,16384")
    p.add_argument("--fractions", default="0.05,0.15,0.3,last")
    p.add_argument("--backends", default=",".join(EXACT))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--target", type=float, default=1.3)
    p.add_argument("--flex-variants", default="",
                   help=f"comma list from {','.join(FLEX_VARIANTS)}, or 'all'")
    p.add_argument("--variant-configs", default="8192/0.15,8192/last",
                   help="context/fraction pairs on which to run the flex variants")
    p.add_argument("--batch-configs", default="1x8192/0.15,1x4096/0.15,4x8192/0.15,4x4096/0.15",
                   help="steps of several requests, COUNTxCONTEXT/FRACTION: per-request launches vs one")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    args = p.parse_args(argv)
    args.compile_flex = None
    if args.smoke:
        args.contexts, args.fractions = "300,520", "0.15,last"
        args.backends, args.reps, args.warmup = "sdpa,flex,triton", 3, 1
        args.hq, args.hkv, args.d = 4, 2, 32
        args.batch_configs = "3x300/0.15"
        args.compile_flex = False  # eager flex: compiling on a small CPU takes minutes
        args.flex_variants = ""
    args.backends = [b for b in args.backends.split(",") if b]
    args.flex_variants = (list(FLEX_VARIANTS) if args.flex_variants == "all"
                          else [b for b in args.flex_variants.split(",") if b])
    args.variant_configs = set(args.variant_configs.split(","))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the variants compile flex_attention itself, once per variant and static shape
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if not args.smoke and not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA GPU (torch sees none); use --smoke for a CPU dry run.",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        args.backends = [b for b in args.backends if b not in ("cudnn", "auto")]
    timer = Timer(device, args.reps, args.warmup)
    results: dict[str, Any] = {"env": environment(device), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()}}
    print(json.dumps(results["env"]), flush=True)
    rows = []
    with torch.inference_mode():
        results["odd_shape_checks"] = guarded(lambda: odd_shape_checks(args, device, dtype))
        print("odd-shape checks:", json.dumps(results["odd_shape_checks"], indent=1), flush=True)
        for i, nk in enumerate(int(c) for c in args.contexts.split(",")):
            for j, frac in enumerate(args.fractions.split(",")):
                row = run_config(nk, frac, args, device, timer, dtype, seed=100 * i + j)
                print(json.dumps(row), flush=True)
                rows.append(row)
        results["batches"] = []
        for spec in [b for b in args.batch_configs.split(",") if b]:
            res = guarded(lambda: run_batch(spec, args, device, timer, dtype))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the step's caches went with run_batch's frame
            print(json.dumps(res), flush=True)
            results["batches"].append(res)
    results["rows"] = rows
    results["summary"] = summary(rows, args.backends, args.target)
    results["broken_backends"] = dict(attn._BROKEN)
    print_table(rows, [*args.backends, *args.flex_variants])
    print(json.dumps(results["summary"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
