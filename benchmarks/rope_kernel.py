"""Delta-RoPE kernel bandwidth on the GPU: Triton kernel vs the torch path vs a plain copy.

Why a copy in the same run: the kernel reads K once and writes it once, so the best it
can do is what a device-to-device copy of the same bytes achieves on this GPU at this
moment. We measure that ceiling (a 1 GiB ``copy_``, bytes read + written, median), then
each variant's effective bandwidth, and report the fraction (target >= 70%).

Shapes are Llama-3-8B's (8 KV heads, head_dim 128, llama3-scaled RoPE, bf16) at N = 1K,
4K, 8K, 16K tokens x 32 layers. Variants:

* ``triton_tables``  - ``apply_rotation_triton`` with cos/sin built once (``_delta_cos_sin``)
* ``triton_delta``   - ``delta_rotate_triton``: angles formed in-kernel from delta + positions
* ``torch_apply``    - ``_apply`` with the same cos/sin (the connector's torch path)
* ``torch_delta``    - the full torch ``delta_rotate`` (cos/sin rebuilt per call)

Three timings each, because per-layer launches of a few MB are host-bound (a Python
Triton launch costs tens of microseconds, the GPU work for 1K tokens about two):

* ``stacked``  - one call over all layers ``[32, N, H, D]`` (tables broadcast over layers),
  replayed from a CUDA graph: the kernel's own bandwidth. The target applies to this.
* ``graph``    - 32 per-layer calls captured in one CUDA graph: device time per layer,
  launch gaps included, no host cost.
* ``eager``    - 32 per-layer calls from Python, as the connector issues them today.

Bytes counted: K read + K written + the angle inputs each variant needs (cos/sin 8 B per
pair per token, or delta + position 16 B per token); torch rows use the same count, so
their GB/s is "useful" bandwidth. Every kernel output is checked against the torch
reference (bf16: 1 ulp; plus float32 at 1e-5) before timing. Several tile configs are
tried; the best per variant and shape is reported. ``torch_delta`` copies inv_freq from
the host on every call, which a CUDA graph cannot capture: eager only.

    python benchmarks/rope_kernel.py --out rope_kernel.json          # needs CUDA
    python benchmarks/rope_kernel.py --smoke                         # CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_FRACTION = 0.70
CONFIGS = [  # (target pairs per program, num_warps); 512 pairs per token at 8 heads x 64 pairs
    (2048, 4),
    (4096, 4),
    (4096, 8),
    (8192, 8),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--smoke", action="store_true",
                   help="CPU run through TRITON_INTERPRET=1 with tiny shapes: checks code paths, no timings")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="calls per timed trial (5 trials, median)")
    p.add_argument("--copy-gib", type=float, default=1.0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernel is decorated lazily, at launch
        args.tokens, args.layers, args.reps, args.copy_gib = [8, 37], 2, 2, 1 / 1024
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("rope_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --smoke for a CPU check of the code paths.", file=sys.stderr)
        return 2
    import triton

    from ucm.sparse.blend import rope_triton
    from ucm.sparse.blend.rope import RopeSpec, _apply, _delta_cos_sin, delta_rotate

    dev = torch.device("cpu" if args.smoke else "cuda")
    cuda = dev.type == "cuda"
    os.environ["UCM_ROPE_KERNEL"] = "torch"  # the torch rows must really be torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def time_ms(fn: Callable[[], object], reps: int, trials: int = 1 if args.smoke else 5) -> float:
        """Median over ``trials`` of (time of ``reps`` back-to-back calls) / reps, in ms.

        On GPU a spin kernel first keeps the device busy while the host queues the calls,
        so device-bound work is timed without host latency in front of it; host-bound work
        (eager per-layer launches) still shows its host rate. CPU: perf_counter.
        """
        fn()
        sync()
        per = []
        for _ in range(trials):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(2_000_000)  # ~1 ms at ~2 GHz
                a.record()
                for _ in range(reps):
                    fn()
                b.record()
                b.synchronize()
                per.append(a.elapsed_time(b) / reps)
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                per.append((time.perf_counter() - t0) * 1e3 / reps)
        return statistics.median(per)

    def graphed(fn: Callable[[], object]) -> Callable[[], object]:
        """Capture ``fn`` in a CUDA graph (after a side-stream warm-up, as torch requires)
        and return its replay; on CPU just ``fn``."""
        if not cuda:
            return fn
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    info: Dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu (interpreter, {platform.processor()})",
        "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
        "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16",
        "reps": args.reps, "target_fraction": TARGET_FRACTION,
    }

    # ---- ceiling: device-to-device copy ---------------------------------------------------
    n_copy = int(args.copy_gib * 2**30) // 2
    src = torch.empty(n_copy, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), reps=max(args.reps // 3, 2))
    copy_gbps = 2 * src.numel() * 2 / (copy_ms / 1e3) / 1e9
    info["copy_bytes"] = 2 * src.numel() * 2
    info["copy_ms"] = round(copy_ms, 4)
    info["copy_GBps"] = round(copy_gbps, 1)
    del src, dst
    print(f"device: {info['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy ceiling: {copy_gbps:.0f} GB/s (read+write, {args.copy_gib:g} GiB)")

    spec = RopeSpec(head_dim=args.head_dim, rotary_dim=args.head_dim, base=500000.0, is_neox_style=True,
                    scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    max_position_embeddings=131072)
    H, D, L = args.heads, args.head_dim, args.layers
    half = spec.rotary_dim // 2
    bf16_tol = dict(rtol=2 ** -7, atol=1e-5)
    results: List[Dict[str, object]] = []
    gen = torch.Generator(device=dev).manual_seed(0)

    for N in args.tokens:
        k_all = torch.randn(L, N, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
        layers = list(k_all.unbind(0))  # contiguous per-layer views, like per-layer KV
        pos = torch.randint(0, 64000, (N,), device=dev, generator=gen)
        delta = torch.randint(-30000, 60000, (N,), device=dev, generator=gen)
        delta[::7] = 0
        cos, sin = _delta_cos_sin(delta, spec, pos, dev)

        # ---- correctness first (compiled kernel on GPU; interpreter in smoke) ------------
        ref = _apply(layers[0].float(), cos, sin, spec)
        for name, out in (("triton_tables", rope_triton.apply_rotation_triton(layers[0], cos, sin, spec)),
                          ("triton_delta", rope_triton.delta_rotate_triton(layers[0], delta, spec, pos))):
            torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), **bf16_tol,
                                       msg=lambda m, n=name: f"{n} N={N} bf16: {m}")
        k32 = layers[0][: min(N, 2048)].float()
        ref32 = _apply(k32, cos[: k32.shape[0]], sin[: k32.shape[0]], spec)
        for name, out in (
                ("triton_tables", rope_triton.apply_rotation_triton(k32, cos[: k32.shape[0]], sin[: k32.shape[0]], spec)),
                ("triton_delta", rope_triton.delta_rotate_triton(k32, delta[: k32.shape[0]], spec, pos[: k32.shape[0]]))):
            torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n} N={N} f32: {m}")
        print(f"N={N}: kernel outputs match the torch reference (bf16 1 ulp, f32 1e-5)")

        k_bytes = 2 * N * H * D * 2  # read + write, bf16
        angle_bytes = {"tables": 2 * N * half * 4, "delta": 2 * N * 8}
        calls = {
            "triton_tables": (lambda k, c: rope_triton.apply_rotation_triton(k, cos, sin, spec, config=c), "tables"),
            "triton_delta": (lambda k, c: rope_triton.delta_rotate_triton(k, delta, spec, pos, config=c), "delta"),
            "torch_apply": (lambda k, c: _apply(k, cos, sin, spec), "tables"),
            "torch_delta": (lambda k, c: delta_rotate(k, delta, spec, from_positions=pos), "delta"),
        }
        for variant, (call, angles) in calls.items():
            nbytes = k_bytes + angle_bytes[angles]
            configs = CONFIGS if variant.startswith("triton") else [None]
            for config in configs:
                c = rope_triton.LaunchConfig(target_pairs=config[0], num_warps=config[1]) if config else None
                row: Dict[str, object] = {"tokens": N, "variant": variant, "config": list(config) if config else None,
                                          "bytes_per_layer": nbytes}
                capturable = variant != "torch_delta"
                timings = {
                    "stacked": (lambda: call(k_all, c)) if capturable else None,
                    "graph": (lambda: [call(k, c) for k in layers]) if capturable else None,
                    "eager": (lambda: [call(k, c) for k in layers]) if config in (None, CONFIGS[0]) else None,
                }
                if not capturable:
                    timings["stacked_eager"] = lambda: call(k_all, c)
                for kind, fn in timings.items():
                    if fn is None:
                        continue
                    try:  # a capture problem must not cost the whole (one-shot) run
                        run = fn if kind.startswith(("eager", "stacked_eager")) else graphed(fn)
                        ms = time_ms(run, reps=args.reps if kind != "stacked" else max(2, args.reps // 3)) / L
                    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, run goes on
                        row[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"
                        print(f"N={N} {variant} {config} {kind}: {row[f'{kind}_error']}", file=sys.stderr)
                        continue
                    gbps = nbytes / (ms / 1e3) / 1e9
                    row[f"{kind}_us_per_layer"] = round(ms * 1e3, 2)
                    row[f"{kind}_GBps"] = round(gbps, 1)
                    row[f"{kind}_fraction_of_copy"] = round(gbps / copy_gbps, 3)
                    del run
                results.append(row)
                if cuda:
                    torch.cuda.empty_cache()
        info.setdefault("cos_sin_us", {})[N] = round(  # type: ignore[index]
            time_ms(lambda: _delta_cos_sin(delta, spec, pos, dev), reps=args.reps) * 1e3, 2)
        del k_all, layers
        if cuda:
            torch.cuda.empty_cache()

    # ---- host cost of one launch (tiny input: the time is all Python + driver) ----------------
    k_tiny = torch.randn(16, H, D, device=dev, dtype=torch.bfloat16)
    d_tiny = torch.zeros(16, dtype=torch.long, device=dev)
    c_tiny, s_tiny = _delta_cos_sin(d_tiny + 5, spec, d_tiny, dev)
    info["host_us_per_call"] = {
        name: round(time_ms(fn, reps=max(args.reps * 10, 2)) * 1e3, 2) for name, fn in (
            ("triton_tables", lambda: rope_triton.apply_rotation_triton(k_tiny, c_tiny, s_tiny, spec)),
            ("triton_delta", lambda: rope_triton.delta_rotate_triton(k_tiny, d_tiny, spec, d_tiny)),
            ("torch_apply", lambda: _apply(k_tiny, c_tiny, s_tiny, spec)),
            ("torch_empty_like", lambda: torch.empty_like(k_tiny)))}

    # ---- best config per (tokens, variant), by the stacked (kernel) time ------------------------
    def rank(row: Dict[str, object]) -> float:
        for kind in ("stacked", "stacked_eager", "graph", "eager"):
            if f"{kind}_us_per_layer" in row:
                return float(row[f"{kind}_us_per_layer"])  # type: ignore[arg-type]
        return float("inf")

    best: Dict[tuple, Dict[str, object]] = {}
    for row in results:
        key = (row["tokens"], row["variant"])
        if key not in best or rank(row) < rank(best[key]):
            best[key] = row
    eager_torch = {n: float(best[(n, "torch_apply")].get("eager_us_per_layer", "nan")) for n in args.tokens}  # type: ignore[arg-type]

    def cell(row: Dict[str, object], kind: str) -> str:
        if f"{kind}_us_per_layer" not in row:
            return f"{'-':>8} {'-':>6} {'-':>6}"
        return (f"{row[f'{kind}_us_per_layer']:>8.2f} {row[f'{kind}_GBps']:>6.0f} "
                f"{100 * row[f'{kind}_fraction_of_copy']:>5.1f}%")  # type: ignore[operator]

    print()
    print(f"per layer of [N, {H}, {D}] bf16 x {L} layers; copy ceiling {copy_gbps:.0f} GB/s; "
          "columns: us per layer, GB/s, % of copy"
          + ("  (SMOKE: interpreter timings mean nothing)" if args.smoke else ""))
    header = (f"{'tokens':>6} {'variant':<14} {'config':<7} | {'stacked (1 launch, graph)':^22} | "
              f"{'per-layer, graph':^22} | {'per-layer, eager':^22} | eager vs torch")
    print(header)
    print("-" * len(header))
    for (n, variant), row in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cfg = "/".join(map(str, row["config"])) if row["config"] else "-"  # type: ignore[arg-type]
        stacked = cell(row, "stacked") if "stacked_us_per_layer" in row else cell(row, "stacked_eager")
        eager_row = row if "eager_us_per_layer" in row else next(
            (r for r in results if r["tokens"] == n and r["variant"] == variant and "eager_us_per_layer" in r), row)
        speed = eager_torch[n] / float(eager_row.get("eager_us_per_layer", "nan"))  # type: ignore[arg-type]
        print(f"{n:>6} {variant:<14} {cfg:<7} | {stacked} | {cell(row, 'graph')} | "
              f"{cell(eager_row, 'eager')} | {speed:>6.2f}x")
    kernel_best = [r for (n, v), r in best.items() if v.startswith("triton")]
    worst = min(float(r.get("stacked_fraction_of_copy", 0.0)) for r in kernel_best)  # type: ignore[arg-type]
    by_config: Dict[str, float] = {}
    for row in results:
        if str(row["variant"]).startswith("triton"):
            key = "/".join(map(str, row["config"]))  # type: ignore[arg-type]
            by_config[key] = by_config.get(key, 0.0) + rank(row)
    info["best_config_overall"] = min(by_config, key=by_config.get)  # type: ignore[arg-type]
    info["worst_stacked_fraction"] = worst
    info["meets_target"] = bool(worst >= TARGET_FRACTION)
    print(f"\nhost cost per call (us): {info['host_us_per_call']}")
    print(f"_delta_cos_sin per load (us): {info['cos_sin_us']}")
    print(f"best tile config over all shapes: {info['best_config_overall']} (target pairs / warps); "
          f"lowest stacked kernel fraction of copy: {100 * worst:.1f}% "
          f"({'meets' if info['meets_target'] else 'below'} the {100 * TARGET_FRACTION:.0f}% target)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "best": list(best.values()), "all": results}, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
