"""Plot cold-prompt TTFT (ucm_cold / full prefill, same run) across saved ttft_gpu runs.

Each input is a ``ttft_gpu.json`` (``--out-dir`` of ``benchmarks/ttft_gpu.py``) with a
label; the plot shows, per prompt size, how much slower a prompt never seen before is
through ucm (full prefill plus saving all its KV) than vLLM's own full prefill, measured
side by side in the same run.

    python benchmarks/plot_cold_saves.py --out benchmarks/results/cold_saves_h100.png \
        "start (s5 cold fix)=docs/ttft_gpu_h100_s5_cold.json" "lent slots=docs/ttft_gpu_h100_s6_lent.json" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(path: Path) -> dict[int, float]:
    """Prompt chunks -> full prefill / ucm_cold median TTFT (1.0 = as fast as vLLM alone)."""
    ttft = json.loads(path.read_text())["ttft"]
    out = {}
    for chunks, modes in ttft.items():
        if "ucm_cold" in modes and "full_prefill" in modes:
            out[int(chunks)] = modes["full_prefill"]["median_ms"] / modes["ucm_cold"]["median_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="label=path/to/ttft_gpu.json, in order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(item.split("=", 1)[0], ratios(Path(item.split("=", 1)[1]))) for item in args.runs]
    sizes = sorted({n for _, r in runs for n in r})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(sizes))
    for k, n in enumerate(sizes):
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(runs))]
        ys = [r.get(n, float("nan")) for _, r in runs]
        ax.bar(xs, ys, width, label=f"{n}x512 tokens")
        for x, y in zip(xs, ys):
            if y == y:
                ax.text(x, y + 0.01, f"{y:.2f}", ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    ax.set_ylabel("full prefill / cold through ucm (TTFT)")
    ax.set_ylim(0, 1.1)
    ax.set_title("Cold prompts (KV saved on the way) vs vLLM full prefill, same run each")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
