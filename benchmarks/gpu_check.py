"""GPU host check for ucm on vLLM 0.26 (CUDA): patch points, KV layout, kernels, correctness.

Run on the GPU host once vLLM is staged (see ../shared/gpu/README.md)::

    PYTHONPATH=/tmp/site:. VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 \\
        python benchmarks/gpu_check.py --out $OUT/gpu_check.json

Sections (each prints a block and goes into the JSON; a failing section is reported
and the next one still runs):

* ``inspect``: what ucm's patch points and connector read, as this vLLM has them
  (Attention class and forward signature, GPUModelRunner._model_forward, InputBatch
  req_ids, KVConnectorBase_V1 methods, SchedulerOutput fields, FLASH_ATTN cache shape
  and stride order, kv_load_failure_policy, the V2 model runner switch).
* ``micro``: host->device copy bandwidth (pageable vs pinned, one copy vs per-block
  copies), whether ``clone()`` keeps pinned memory, delta-RoPE throughput, and the
  exact-mask attention of Blend (SDPA, GQA) against the bottom-right FlashAttention
  call of the same shape.
* ``saves``: the CUDA save path stores exactly the device blocks (``PASS_saves``).
* ``equality``: a tiny random Llama (fp16 and bf16) in vLLM with FLASH_ATTN: Blend at
  ratio 1.0 must give the tokens of a plain full prefill with logprobs within
  tolerance; ratio 0 must reuse the cached chunks. Each engine runs in its own process
  through tests/engine_runner.py.

``--mode default`` (the default) runs every engine of ``equality`` and ``tp`` in vLLM's
default mode (torch.compile + CUDA graphs: ucm runs a Blend step eagerly and every other
step on the compiled path); ``--mode eager`` sets ``enforce_eager=True`` in all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect as pyinspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/: the prompts, tiny models and engine runner the tests use
from tests.rag_prompts import END, Rag  # noqa: E402


def section(name: str, fn: Callable[[], dict], results: dict) -> None:
    print(f"\n===== {name} =====", flush=True)
    t0 = time.time()
    try:
        results[name] = fn()
    except Exception as exc:  # report and go on
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results[name], indent=1, default=str)[:6000], flush=True)


# ---------------------------------------------------------------------------------
def inspect_vllm() -> dict:
    import torch
    import vllm

    out: dict[str, Any] = {"vllm": vllm.__version__, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    from ucm.integration.vllm import patches

    module = patches.check_vllm_version(vllm.__version__)
    import importlib

    attn_mod = importlib.import_module(module)
    out["attention_class"] = f"{module}.Attention: {hasattr(attn_mod, 'Attention')}"
    out["attention_forward_sig"] = str(pyinspect.signature(attn_mod.Attention.forward))
    from vllm.v1.worker import gpu_model_runner

    runner = gpu_model_runner.GPUModelRunner
    out["model_forward_sig"] = str(pyinspect.signature(runner._model_forward))
    from vllm.v1.worker.gpu_input_batch import InputBatch

    out["input_batch_req_ids"] = isinstance(getattr(InputBatch, "req_ids", None), property)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from ucm.integration.vllm.connector import UCMConnector

    sigs = {}
    for name, fn in vars(UCMConnector).items():
        if callable(fn) and not name.startswith("_") and hasattr(KVConnectorBase_V1, name):
            base = pyinspect.signature(getattr(KVConnectorBase_V1, name))
            ours = pyinspect.signature(fn)
            sigs[name] = "same" if list(base.parameters) == list(ours.parameters) else f"base{base} ours{ours}"
    out["connector_methods"] = sigs
    out["connector_init_sig"] = str(pyinspect.signature(KVConnectorBase_V1.__init__))
    from vllm.v1.core.sched import output as sched_out

    fields = lambda cls: sorted(getattr(cls, "__dataclass_fields__", {}))  # noqa: E731
    out["NewRequestData"] = fields(sched_out.NewRequestData)
    out["CachedRequestData"] = fields(sched_out.CachedRequestData)
    out["SchedulerOutput_has_sync_kv_loads"] = "has_sync_kv_loads" in fields(sched_out.SchedulerOutput)
    from vllm.config import KVTransferConfig

    out["kv_load_failure_policy"] = str(KVTransferConfig.__dataclass_fields__["kv_load_failure_policy"].type)
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.utils import get_kv_cache_layout

    out["flash_attn_name"] = FlashAttentionBackend.get_name()
    out["flash_attn_shape(7,16,8,128)"] = FlashAttentionBackend.get_kv_cache_shape(7, 16, 8, 128)
    try:
        from vllm.config import VllmConfig, set_current_vllm_config

        with set_current_vllm_config(VllmConfig()):
            out["flash_attn_stride_order"] = FlashAttentionBackend.get_kv_cache_stride_order()
            out["kv_cache_layout"] = get_kv_cache_layout()
    except Exception as exc:  # noqa: BLE001
        out["flash_attn_stride_order"] = repr(exc)[:200]
    import vllm.envs as envs

    out["VLLM_USE_V2_MODEL_RUNNER"] = envs.VLLM_USE_V2_MODEL_RUNNER
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401

        out["vllm_flash_attn"] = True
    except Exception as exc:  # noqa: BLE001
        out["vllm_flash_attn"] = repr(exc)
    return out


# ---------------------------------------------------------------------------------
def _time_cuda(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def micro() -> dict:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    out: dict[str, Any] = {}
    # -- clone of a pinned tensor
    p = torch.empty(16, pin_memory=True)
    out["clone_keeps_pinned"] = p.clone().is_pinned()
    # -- H2D: 1 GiB in 512 blocks of 2 MiB (Llama-3-8B: 32 layers x 2 x 16 tokens x 8 x 128 bf16)
    shape = (32, 2, 16, 8, 128)
    n = 512
    gib = n * 2 * 32 * 2 * 16 * 8 * 128 / 2**30
    base = torch.randn(shape).to(torch.bfloat16)
    pageable = [base.clone() for _ in range(n)]
    pinned = [t.pin_memory() for t in pageable]
    dst = torch.empty((n,) + shape, dtype=torch.bfloat16, device=dev)
    big_pinned = torch.empty((n,) + shape, dtype=torch.bfloat16, pin_memory=True)
    big_pageable = torch.empty((n,) + shape, dtype=torch.bfloat16)

    def per_block(src):
        return lambda: torch._foreach_copy_(list(dst.unbind(0)), src, non_blocking=True)

    def loop_copy(src):
        def run():
            for i, t in enumerate(src):
                dst[i].copy_(t, non_blocking=True)
        return run

    for name, fn in (("one_copy_pinned", lambda: dst.copy_(big_pinned, non_blocking=True)),
                     ("one_copy_pageable", lambda: dst.copy_(big_pageable, non_blocking=True)),
                     ("foreach_blocks_pinned", per_block(pinned)),
                     ("foreach_blocks_pageable", per_block(pageable)),
                     ("loop_blocks_pinned", loop_copy(pinned))):
        t0 = time.perf_counter()
        ms = _time_cuda(fn, reps=5, warmup=1)
        out[f"h2d_{name}_GBps"] = round(gib * 2**30 / (ms / 1e3) / 1e9, 1)
        # host time to *issue* (pinned copies return before they finish)
        t0 = time.perf_counter()
        fn()
        out[f"h2d_{name}_issue_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        torch.cuda.synchronize()
    # -- delta-RoPE (llama3 scaled) on 8K tokens x 8 heads x 128, bf16
    from ucm.sparse.blend.rope import RopeSpec, _apply, _delta_cos_sin

    spec = RopeSpec(head_dim=128, rotary_dim=128, base=500000.0, is_neox_style=True,
                    scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    N = 8192
    k = torch.randn(N, 8, 128, device=dev, dtype=torch.bfloat16)
    delta = torch.full((N,), 1000, device=dev, dtype=torch.long)
    pos = torch.arange(N, device=dev)
    cos, sin = _delta_cos_sin(delta, spec, pos, dev)
    ms = _time_cuda(lambda: _apply(k, cos, sin, spec))
    out["delta_rope_8k_ms"] = round(ms, 3)
    out["delta_rope_8k_GBps"] = round(2 * k.numel() * 2 / (ms / 1e3) / 1e9, 1)
    out["delta_cos_sin_8k_ms"] = round(_time_cuda(lambda: _delta_cos_sin(delta, spec, pos, dev)), 3)
    # -- exact-mask attention (Blend) vs bottom-right FlashAttention, 8K context, 15% + 64 rows
    from ucm.sparse.blend.attention import causal_attention_by_position

    nk, hq, hkv, d = 8288, 32, 8, 128
    sel = torch.randperm(nk - 64, device=dev)[: int(0.15 * (nk - 64))]
    q_pos = torch.cat([sel.sort().values, torch.arange(nk - 64, nk, device=dev)])
    nq = q_pos.numel()
    q = torch.randn(nq, hq, d, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(nk, hkv, d, device=dev, dtype=torch.bfloat16)
    vv = torch.randn(nk, hkv, d, device=dev, dtype=torch.bfloat16)
    k_pos = torch.arange(nk, device=dev)
    scale = d ** -0.5
    out["attn_shape"] = f"nq={nq} nk={nk} hq={hq} hkv={hkv} d={d}"
    ref = causal_attention_by_position(q.float(), q_pos, kk.float(), vv.float(), k_pos, scale, backend="sdpa")
    out["attn_ucm_sdpa_ms"] = round(_time_cuda(lambda: causal_attention_by_position(q, q_pos, kk, vv, k_pos, scale, backend="sdpa")), 3)
    got = causal_attention_by_position(q, q_pos, kk, vv, k_pos, scale, backend="sdpa").float()
    out["attn_ucm_sdpa_relerr"] = float((got - ref).norm() / ref.norm())

    def expanded():
        g = hq // hkv
        mask = k_pos[None, :] <= q_pos[:, None]
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], kk.repeat_interleave(g, 1).transpose(0, 1)[None],
            vv.repeat_interleave(g, 1).transpose(0, 1)[None], attn_mask=mask, scale=scale)[0].transpose(0, 1)

    out["attn_sdpa_expanded_heads_ms"] = round(_time_cuda(expanded), 3)
    out["attn_sdpa_expanded_relerr"] = float((expanded().float() - ref).norm() / ref.norm())
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        cu_q = torch.tensor([0, nq], device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0, nk], device=dev, dtype=torch.int32)
        fa = lambda: flash_attn_varlen_func(q, kk, vv, max_seqlen_q=nq, cu_seqlens_q=cu_q, max_seqlen_k=nk,  # noqa: E731
                                            cu_seqlens_k=cu_k, softmax_scale=scale, causal=True)
        out["attn_flash_bottom_right_ms"] = round(_time_cuda(fa), 3)
    except Exception as exc:  # noqa: BLE001
        out["attn_flash_bottom_right_ms"] = repr(exc)[:300]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out[f"attn_ucm_sdpa_only_{backend}_ms"] = round(
                        _time_cuda(lambda: causal_attention_by_position(q, q_pos, kk, vv, k_pos, scale, backend="sdpa"), reps=5), 3)
                    got = causal_attention_by_position(q, q_pos, kk, vv, k_pos, scale, backend="sdpa").float()
                    out[f"attn_ucm_sdpa_only_{backend}_relerr"] = float((got - ref).norm() / ref.norm())
            except Exception as exc:  # noqa: BLE001
                out[f"attn_ucm_sdpa_only_{backend}_ms"] = repr(exc)[:200]
    except Exception as exc:  # noqa: BLE001
        out["sdpa_backends"] = repr(exc)[:200]
    return out


# ---------------------------------------------------------------------------------
def build_tiny_llama(workdir: Path) -> Path:
    """The tests' tiny Llama with head_dim 64 (tests/tiny_models.py), under ``workdir``."""
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama_h64", workdir)


def run_engine(spec: dict, workdir: Path, enable_sparse: bool) -> dict:
    """An engine in its own process (tests/engine_runner.py), plus the log lines that say
    which backend, scheduling and compilation it ran."""
    from tests.engine_runner import engine_process

    t0 = time.time()
    code, result, stderr = engine_process(spec, workdir, enable_sparse)
    if code != 0:
        raise RuntimeError(f"engine failed ({code}) after {time.time() - t0:.0f}s:\n{stderr[-5000:]}")
    (workdir / "stderr.txt").write_text(stderr[-20000:])
    lines = stderr.splitlines()
    backend = [ln for ln in lines if "backend" in ln.lower() and "attention" in ln.lower()]
    scheduling = [ln[-60:] for ln in lines if "synchronous scheduling is" in ln]
    compiled = [ln[-160:] for ln in lines
                if "torch.compile" in ln or "Graph capturing finished" in ln or "enforce_eager" in ln.lower()]
    result["_log"] = backend[:3] + scheduling[:1] + compiled[:3] + [ln[-300:] for ln in lines
                                                     if "ucm" in ln and ("WARN" in ln or "ERROR" in ln)][:8]
    result["_seconds"] = round(time.time() - t0, 1)
    return result


def _diff(a: dict, b: dict) -> tuple[bool, float]:
    same = a["tokens"] == b["tokens"]
    return same, max(abs(p - q) for p, q in zip(a["logprobs"], b["logprobs"]))


def equality(workdir: Path, eager: bool, dtypes: tuple[str, ...] = ("float16", "bfloat16")) -> dict:
    model = str(build_tiny_llama(workdir))
    rag = Rag(seed=0)
    prompts = [rag.prompt([2, 0, 1], 0), rag.prompt([0, 3, 1], 2), rag.prompt([1, 1, 2], 3), rag.prompt([4, 2], 1)]
    out: dict[str, Any] = {}
    # pay_policy "always": these checks are about the Blend path itself, which the policy
    # would skip on a model this small (a plain prefill is faster there).
    blend = {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}],
             "ucm_sparse_config": {"Blend": {"chunk_end_token_id": END, "pay_policy": "always",
                                             "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 1.0}}}}}
    for dtype in dtypes:
        engine = {"dtype": dtype, "gpu_memory_utilization": 0.25, "max_model_len": 4096, "enforce_eager": eager}
        gen = lambda name, ps, **kw: {"op": "generate", "name": name, "prompts": ps, "max_tokens": 8, **kw}  # noqa: E731
        plain = run_engine({"model": model, "ucm": None, "engine": engine, "actions": [
            gen("main", [{"ids": p} for p in prompts])]}, workdir / f"plain_{dtype}", enable_sparse=False)
        ucm_actions = [
            {"op": "patched", "name": "patched"},
            gen("precompute", [{"ids": rag.chunks[i]} for i in range(5)], max_tokens=1),
            gen("ratio1", [{"ids": p} for p in prompts], batch=False),
            gen("ratio1_batch", [{"ids": p} for p in prompts]),
            gen("ratio0", [{"ids": p, "ratio": 0.0} for p in prompts], batch=False),
            gen("ratio015", [{"ids": p, "ratio": 0.15} for p in prompts], batch=False)]
        ucm = run_engine({"model": model, "ucm": blend, "engine": dict(engine, enable_prefix_caching=False),
                          "actions": ucm_actions}, workdir / f"ucm_{dtype}", enable_sparse=True)
        res: dict[str, Any] = {"patched": ucm["patched"], "log": ucm["_log"][:2],
                               "engine_seconds": [plain["_seconds"], ucm["_seconds"]]}
        for name in ("ratio1", "ratio1_batch", "ratio0", "ratio015"):
            rows = []
            for a, b in zip(ucm[name], plain["main"]):
                same, dlp = _diff(a, b)
                rows.append({"same_tokens": same, "max_dlogprob": round(dlp, 5),
                             "chunk_hit": a["stats"].get("chunk_hit_tokens"),
                             "recompute_ratio": a["stats"].get("recompute_ratio")})
            res[name] = rows
        tol = 0.05 if dtype == "float16" else 0.15
        # The same reuse requests with the loads written the previous way (per-layer torch
        # ops, whole blocks): the Triton load kernel and layer-group copies must load the
        # same KV (ratio 0 output depends on every loaded row).
        torchload = run_engine({"model": model, "ucm": dict(blend, engine_options={"load_layer_group": -1}),
                                "engine": dict(engine, enable_prefix_caching=False),
                                "env": {"UCM_LOAD_KERNEL": "torch"},
                                "actions": ucm_actions[1:]},  # the same requests in the same order
            workdir / f"torchload_{dtype}", enable_sparse=True)
        loads = []
        for name in ("ratio0", "ratio015"):
            for a, b in zip(ucm[name], torchload[name]):
                same, dlp = _diff(a, b)
                loads.append({"mode": name, "same_tokens": same, "max_dlogprob": round(dlp, 5)})
        res["kernel_vs_torch_loads"] = loads
        res["PASS_loads"] = all(r["same_tokens"] and r["max_dlogprob"] < 0.02 for r in loads)
        res["PASS_ratio1"] = all(r["same_tokens"] and r["max_dlogprob"] < tol for r in res["ratio1"] + res["ratio1_batch"])
        res["PASS_reuse"] = all((r["chunk_hit"] or 0) > 0 for r in res["ratio0"][:3])
        out[dtype] = res
    return out


def control(workdir: Path, dtypes: tuple[str, ...] = ("bfloat16",)) -> dict:
    """How far plain vLLM's eager and default (compiled, CUDA-graph) modes part on the
    equality prompts, and ucm under its default pay policy at ratio 1.0 against plain vLLM
    in the default mode (that request runs as a plain prefill, so it must be bit-equal).

    A Blend step runs eagerly inside a compiled engine; where the eager/compiled control
    parts by as much as "always" Blend at ratio 1.0 does, the difference is the modes'
    rounding, not Blend's."""
    model = str(build_tiny_llama(workdir))
    rag = Rag(seed=0)
    prompts = [rag.prompt([2, 0, 1], 0), rag.prompt([0, 3, 1], 2), rag.prompt([1, 1, 2], 3), rag.prompt([4, 2], 1)]
    auto = {"ucm_connectors": [{"ucm_connector_name": "UcmDramStore", "ucm_connector_config": {}}],
            "ucm_sparse_config": {"Blend": {"chunk_end_token_id": END,
                                            "compute_meta": {"model.layers.1.self_attn.attn": {"ratio": 1.0}}}}}
    gen = lambda name, ps, **kw: {"op": "generate", "name": name, "prompts": ps, "max_tokens": 8, **kw}  # noqa: E731
    out: dict[str, Any] = {}
    for dtype in dtypes:
        engine = {"dtype": dtype, "gpu_memory_utilization": 0.25, "max_model_len": 4096}
        runs = {}
        for label, eager in (("eager", True), ("default", False)):
            runs[label] = run_engine({"model": model, "ucm": None, "engine": dict(engine, enforce_eager=eager),
                                      "actions": [gen("main", [{"ids": p} for p in prompts]),
                                                  gen("one_by_one", [{"ids": p} for p in prompts], batch=False)]},
                                     workdir / f"control_{label}_{dtype}", enable_sparse=False)
        ucm = run_engine({"model": model, "ucm": auto, "engine": dict(engine, enforce_eager=False), "actions": [
            gen("precompute", [{"ids": rag.chunks[i]} for i in range(5)], max_tokens=1),
            gen("ratio1", [{"ids": p, "ratio": 1.0} for p in prompts], batch=False)]},
            workdir / f"control_ucm_{dtype}", enable_sparse=True)
        rows = lambda xs, ys: [dict(zip(("same_tokens", "max_dlogprob"), (s, round(d, 5))))  # noqa: E731
                               for s, d in (_diff(a, b) for a, b in zip(xs, ys))]
        res = {"eager_vs_default": rows(runs["eager"]["main"], runs["default"]["main"]),
               "default_batch_vs_one_by_one": rows(runs["default"]["main"], runs["default"]["one_by_one"]),
               "ucm_auto_ratio1_vs_default": rows(ucm["ratio1"], runs["default"]["one_by_one"]),
               "ucm_auto_ratio1_decisions": [r["stats"].get("blend_reason") for r in ucm["ratio1"]],
               # What else differs from plain vLLM for those requests: KV loaded from ucm's
               # store (prefix blocks stored by the precompute requests) is computed by
               # another forward, so it may part from the plain prefill in the last bits.
               "ucm_auto_ratio1_hits": [{k: r["stats"].get(k) for k in ("prefix_hit_tokens", "chunk_hit_tokens")}
                                        for r in ucm["ratio1"]]}
        res["PASS_auto_ratio1_exact"] = all(r["same_tokens"] and r["max_dlogprob"] == 0.0
                                            for r in res["ucm_auto_ratio1_vs_default"])
        out[dtype] = res
    return out


def equality_tp(workdir: Path, tp: int, eager: bool) -> dict:
    """Tensor parallel: Blend with ``tp`` ranks against one rank (fp16, tiny Llama).

    The host-memory store is private to each process, so the TP engine uses the file
    store (every rank saves and loads its own shard under its rank key). Ratio 1.0 must
    match the plain TP=1 engine; ratio 0.15 must match Blend at 0.15 on one rank
    (which only holds if every rank selected the same rows: the deviation is
    all-reduced before the selection).
    """
    model = str(build_tiny_llama(workdir))
    rag = Rag(seed=0)
    prompts = [rag.prompt([2, 0, 1], 0), rag.prompt([0, 3, 1], 2), rag.prompt([1, 1, 2], 3), rag.prompt([4, 2], 1)]
    gen = lambda name, ps, **kw: {"op": "generate", "name": name, "prompts": ps, "max_tokens": 8, **kw}  # noqa: E731

    def blend(store: Path) -> dict:
        return {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                                    "ucm_connector_config": {"storage_backends": str(store)}}],
                "ucm_sparse_config": {"Blend": {"chunk_end_token_id": END, "pay_policy": "always", "compute_meta": {
                    "model.layers.1.self_attn.attn": {"ratio": 1.0}}}}}

    actions = [gen("precompute", [{"ids": rag.chunks[i]} for i in range(5)], max_tokens=1),
               gen("ratio1", [{"ids": p} for p in prompts], batch=False),
               gen("ratio015", [{"ids": p, "ratio": 0.15} for p in prompts], batch=False)]
    engine = {"dtype": "float16", "gpu_memory_utilization": 0.25, "max_model_len": 4096,
              "enable_prefix_caching": False, "enforce_eager": eager}
    plain = run_engine({"model": model, "ucm": None, "engine": engine, "actions": [
        gen("main", [{"ids": p} for p in prompts])]}, workdir / "tp_plain1", enable_sparse=False)
    one = run_engine({"model": model, "ucm": blend(workdir / "store_tp1"), "engine": engine, "actions": actions},
                     workdir / "tp_blend1", enable_sparse=True)
    many = run_engine({"model": model, "ucm": blend(workdir / f"store_tp{tp}"),
                       "engine": dict(engine, tensor_parallel_size=tp), "actions": actions},
                      workdir / f"tp_blend{tp}", enable_sparse=True)
    out: dict[str, Any] = {"log": many["_log"][:4], "engine_seconds": [plain["_seconds"], one["_seconds"],
                                                                         many["_seconds"]]}
    rows = []
    for name, ref in (("ratio1", plain["main"]), ("ratio015", one["ratio015"])):
        for a, b in zip(many[name], ref):
            same, dlp = _diff(a, b)
            rows.append({"case": name, "same_tokens": same, "max_dlogprob": round(dlp, 5),
                         "chunk_hit": a["stats"].get("chunk_hit_tokens")})
    one_vs_plain = [_diff(a, b) for a, b in zip(one["ratio015"], plain["main"])]
    out["rows"] = rows
    out["tp1_ratio015_vs_plain_max_dlogprob"] = round(max(d for _, d in one_vs_plain), 4)
    out["PASS_tp"] = all(r["same_tokens"] and r["max_dlogprob"] < 0.05 for r in rows)
    out["PASS_reuse"] = all((r["chunk_hit"] or 0) > 0 for r in rows)
    return out


def saves() -> dict:
    """The CUDA save path stores exactly the device blocks, both into slots the DRAM tier
    lends (its arena) and into pinned staging buffers (a store that lends none): 70 blocks
    (two full pieces and a partial one), read back. Then the latency of a small
    device->host copy on the compute stream issued right behind a cold 8K prompt's save
    (1,030 blocks of 2 MiB), with 1 and 2 pieces queued at a time against all of them queued
    at once: what the step's sampled tokens wait for (GPU time from the end of the
    "sampler" to the end of its copy)."""
    import torch

    from ucm.engine import kv_saver
    from ucm.engine.kv_saver import BLOCK_LAYOUT, STAGE_BLOCKS, KVSaver
    from ucm.store.dram_store import UcmDramStore

    out: dict[str, Any] = {}
    blocks = torch.randn(2 * STAGE_BLOCKS + 6, 4, 2, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    keys = [i.to_bytes(4, "little") * 4 for i in range(blocks.shape[0])]
    for case, reserve in (("lent", True), ("staged", False)):
        store = UcmDramStore(capacity_bytes=1 << 30)
        saver = KVSaver(store, block_tokens=16, tp_rank=0, rope=None, max_step_tokens=4096)
        if reserve:
            saver.reserve(num_layers=4, num_kv_heads=2, head_dim=128, element_size=2)
        t0 = time.perf_counter()
        task = saver._dump_when_copied(keys, blocks)
        issue_ms = (time.perf_counter() - t0) * 1e3
        store.wait(task)
        got = store.wait(store.load(keys, BLOCK_LAYOUT))
        arena = store._arena
        in_arena = arena is not None and all(
            arena.memory.data_ptr() <= g.data_ptr() < arena.memory.data_ptr() + arena.memory.numel() for g in got)
        out[case] = {"blocks": blocks.shape[0], "issue_ms": round(issue_ms, 2), "in_arena": in_arena,
                     "same": all(torch.equal(g, blocks[i].cpu()) for i, g in enumerate(got))}
    out["PASS_saves"] = out["lent"]["same"] and out["staged"]["same"] and out["lent"]["in_arena"]
    # A cold 8K-token prompt of Llama-3-8B: 1,030 blocks of 2 MiB (prefix and chunk keys).
    big = torch.randn(1030, 32, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    store = UcmDramStore(capacity_bytes=big.shape[0] * big[0].nbytes)
    saver = KVSaver(store, block_tokens=16, tp_rank=0, rope=None, max_step_tokens=8192)
    default = saver.copies_queued
    saver.reserve(num_layers=32, num_kv_heads=8, head_dim=128, element_size=2)
    small = torch.ones(64, device="cuda")
    small_host = torch.empty(64, pin_memory=True)
    latency = {}
    try:
        for label, depth in (("queued_1", 1), ("queued_2", 2), ("queued_all", 10**9), ("queued_1_again", 1)):
            saver.copies_queued = depth
            keys = [hashlib.sha256(f"{label}-{i}".encode()).digest() for i in range(big.shape[0])]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.cuda._sleep(20_000_000)  # "the forward": ~10 ms of work on the compute stream
            task = saver._dump_when_copied(keys, big)  # its copies wait for the forward
            time.sleep(0.002)  # the host moves on to the sampler while the forward runs
            torch.cuda._sleep(1_000_000)  # "the sampler"
            ready, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ready.record()
            small_host.copy_(small, non_blocking=True)  # "the sampled tokens", as vLLM copies them
            done.record()
            done.synchronize()
            store.wait(task)
            latency[label] = {"small_copy_ms": round(ready.elapsed_time(done), 2),
                              "save_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    finally:
        saver.copies_queued = default
    out["behind_a_cold_8k_save"] = latency
    del big
    out["read_layers_8k"] = _save_gather_8k()
    out["PASS_saves"] = out["PASS_saves"] and out["read_layers_8k"]["same"]
    return out


def _save_gather_8k() -> dict:
    """The save's gather of a cold 8K-token Llama-3-8B prompt (1,030 blocks: prefix keys,
    then the same slots under chunk keys rotated back by their chunk's position) from 32
    vLLM 0.26 FLASH_ATTN caches: the Triton kernel against the per-layer torch path, equal
    results and GPU time side by side (CUDA events, median of 10)."""
    import torch

    from ucm.engine import kv_load
    from ucm.engine.kv_layout import flash_attn_view, token_slots
    from ucm.sparse.blend.rope import RopeSpec

    layers, heads, dim, bs, b = 32, 8, 128, 16, 16
    spec = RopeSpec(head_dim=dim, rotary_dim=dim, base=500000.0, is_neox_style=True)
    tokens = 515 * b
    caches = [torch.randn(600, heads, bs, 2 * dim, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    views = [flash_attn_view(c, heads, dim) for c in caches]
    table = torch.randperm(600)[:515]
    position = torch.cat([torch.arange(tokens)] * 2)
    chunk_start = (position // 512) * 512  # 512-token chunks stored as if at 0
    delta = torch.cat([torch.zeros(tokens, dtype=torch.long), chunk_start[tokens:]])
    rows = torch.stack([torch.arange(2 * tokens), token_slots(table, position, bs), position, delta]).cuda()
    out: dict[str, Any] = {}
    blocks = {}
    user_setting = os.environ.get(kv_load.KERNEL_ENV)
    for mode in ("triton", "torch"):
        os.environ[kv_load.KERNEL_ENV] = mode
        blocks[mode] = torch.empty(2 * 515, layers, 2, b, heads, dim, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(11):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            kv_load.read_layers(blocks[mode], views, rows, spec, True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[f"{mode}_ms"] = round(sorted(times[1:])[5], 3)
    if user_setting is None:
        os.environ.pop(kv_load.KERNEL_ENV)
    else:
        os.environ[kv_load.KERNEL_ENV] = user_setting
    diff = (blocks["triton"].float() - blocks["torch"].float()).abs()
    out["max_abs_diff"] = float(diff.max())
    out["prefix_rows_equal"] = bool(torch.equal(blocks["triton"][:515], blocks["torch"][:515]))
    out["same"] = out["prefix_rows_equal"] and out["max_abs_diff"] <= 2 ** -6 * float(blocks["torch"].abs().max())
    out["GBps_triton"] = round(2 * blocks["triton"].nbytes / out["triton_ms"] / 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--only", nargs="*", default=["inspect", "micro", "saves", "equality"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tp", type=int, default=2, help="ranks for the 'tp' section")
    ap.add_argument("--mode", choices=["default", "eager"], default="default",
                    help="engines of 'equality' and 'tp': vLLM's default mode (torch.compile + CUDA graphs) "
                         "or enforce_eager=True")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"],
                    help="dtypes of the 'equality' section")
    args = ap.parse_args()
    eager = args.mode == "eager"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ucm_gpu_check_"))
    results: dict[str, Any] = {"mode": {"mode": args.mode, "enforce_eager": eager}}
    if "inspect" in args.only:
        section("inspect", inspect_vllm, results)
    if "micro" in args.only:
        section("micro", micro, results)
    if "equality" in args.only:
        section("equality", lambda: equality(workdir, eager, tuple(args.dtypes)), results)
    if "saves" in args.only:
        section("saves", saves, results)
    if "control" in args.only:
        section("control", lambda: control(workdir, tuple(args.dtypes)), results)
    if "tp" in args.only:
        section("tp", lambda: equality_tp(workdir, args.tp, eager), results)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print("\nSUMMARY", args.mode, "mode", json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk.startswith(("PASS", "error"))} for k, v in results.items()
         if k != "mode"}, default=str))
    eq = results.get("equality", {})
    for dtype in ("float16", "bfloat16"):
        if isinstance(eq.get(dtype), dict):
            print(dtype, "PASS_ratio1", eq[dtype].get("PASS_ratio1"), "PASS_reuse", eq[dtype].get("PASS_reuse"),
                  "PASS_loads", eq[dtype].get("PASS_loads"))


if __name__ == "__main__":
    main()
