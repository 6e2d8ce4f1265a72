"""Per-mode results of the Blend example: aggregation, table, JSON, CSV and plot.

The example runs every sample in several *modes* (``full_prefill`` and
``blend_<ratio>``) and records one :class:`ModeRun` per (mode, sample). This
module turns those into the numbers a reader compares: TTFT, answer quality
against the gold answers (F1, EM), fidelity to the full-prefill answer
(first-token agreement, ROUGE-L) and how much of the prompt was computed.

It imports no vLLM (so it is testable and usable on saved JSON) and matplotlib
only inside :func:`plot_modes`, which reports ``False`` instead of failing when
matplotlib is missing: a plot is a convenience, the JSON and CSV are the record.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

from rag_eval.metrics import exact_match, f1_score, first_token_agreement, mean, rouge_l

logger = logging.getLogger(__name__)

FULL_PREFILL = "full_prefill"
BLEND_PREFIX = "blend_"

#: Aggregate columns in table and CSV order (``answers`` and per-sample data stay in JSON).
SUMMARY_COLUMNS = (
    "mode", "ratio", "samples", "ttft_ms", "ttft_ms_median", "speedup_vs_full", "f1", "em",
    "first_token_agreement", "rougeL_vs_full", "recompute_fraction", "prompt_tokens",
    "prefix_hit_tokens", "chunk_hit_tokens", "reused_tokens", "recomputed_reused_tokens",
)


def mode_name(ratio: float) -> str:
    """``blend_<ratio>`` with the ratio as ``format(r, "g")``: blend_0, blend_0.15, blend_1."""
    return f"{BLEND_PREFIX}{format(float(ratio), 'g')}"


def mode_ratio(name: str) -> Optional[float]:
    """The recompute ratio a mode name stands for: 1.0 for full prefill (everything is
    computed), the number for ``blend_<r>``, None for anything else."""
    if name == FULL_PREFILL:
        return 1.0
    if name.startswith(BLEND_PREFIX):
        try:
            return float(name[len(BLEND_PREFIX):])
        except ValueError:
            return None
    return None


def clean_answer(text: str) -> str:
    """The answer as scored: the first non-empty line, stripped.

    Instruct models often add an explanation after a line break, or run into
    ``max_tokens`` mid-sentence; HotpotQA and LongBench score a short span, so only
    the first line counts (the raw text is kept in the JSON too).
    """
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass
class ModeRun:
    """One request: a sample asked in one mode.

    Token counts are ucm's per-request stats (0 where ucm did not see the request,
    e.g. without the connector). ``reused_tokens`` kept their cached KV;
    ``recomputed_reused_tokens`` had a cache hit but were recomputed by Blend.
    """

    answer: str
    token_ids: list[int]
    ttft_ms: float
    prompt_tokens: int
    prefix_hit_tokens: int = 0
    chunk_hit_tokens: int = 0
    reused_tokens: int = 0
    recomputed_reused_tokens: int = 0
    raw_text: str = ""
    latency_ms: Optional[float] = None

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens whose KV this request computed itself (not a prefix hit, not
        reused from a chunk). Layers before Blend's first check layer compute every
        scheduled token; this counts the tokens computed through the whole model."""
        return max(0, self.prompt_tokens - self.prefix_hit_tokens - self.reused_tokens)

    @property
    def recompute_fraction(self) -> float:
        """``computed_tokens / prompt_tokens``: 1.0 for a full prefill."""
        return self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @classmethod
    def from_stats(cls, answer: str, token_ids: Sequence[int], ttft_ms: float, prompt_tokens: int,
                   stats: Mapping[str, Any], raw_text: str = "", latency_ms: Optional[float] = None) -> ModeRun:
        """Build from ucm's ``request_stats`` dict (missing keys count as 0)."""
        def get(key: str) -> int:
            value = stats.get(key)
            return int(value) if value is not None else 0

        return cls(answer=answer, token_ids=list(token_ids), ttft_ms=float(ttft_ms), prompt_tokens=int(prompt_tokens),
                   prefix_hit_tokens=get("prefix_hit_tokens"), chunk_hit_tokens=get("chunk_hit_tokens"),
                   reused_tokens=get("reused_tokens"), recomputed_reused_tokens=get("recomputed_reused_tokens"),
                   raw_text=raw_text, latency_ms=latency_ms)


@dataclass
class SampleScore:
    """One run scored: against the gold answers and against the full-prefill run."""

    f1: float
    em: float
    first_token_agreement: Optional[float]
    rougeL_vs_full: Optional[float]


def score_run(run: ModeRun, golds: Sequence[str], reference: Optional[ModeRun]) -> SampleScore:
    """F1/EM of the cleaned answer vs ``golds``; fidelity vs ``reference`` (None: unknown)."""
    if reference is None:
        return SampleScore(f1_score(run.answer, golds), exact_match(run.answer, golds), None, None)
    return SampleScore(
        f1=f1_score(run.answer, golds),
        em=exact_match(run.answer, golds),
        first_token_agreement=first_token_agreement(run.token_ids, reference.token_ids),
        rougeL_vs_full=rouge_l(run.answer, reference.answer),
    )


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported TTFT is one that happened)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize_mode(name: str, runs: Sequence[ModeRun], golds: Sequence[Sequence[str]],
                   reference: Optional[Sequence[ModeRun]] = None,
                   reference_ttft_ms: Optional[float] = None) -> dict[str, Any]:
    """Aggregates of one mode over the samples (all lists in dataset order).

    ``reference``: the full-prefill runs of the same samples, for the fidelity
    columns (None leaves them None). ``reference_ttft_ms``: the full-prefill mean
    TTFT, for ``speedup_vs_full``. Token counts are per-request means.
    """
    if len(golds) != len(runs) or (reference is not None and len(reference) != len(runs)):
        raise ValueError("runs, golds and reference must hold one entry per sample")
    scores = [score_run(r, g, reference[i] if reference is not None else None)
              for i, (r, g) in enumerate(zip(runs, golds))]
    ttfts = [r.ttft_ms for r in runs]
    ttft = mean(ttfts)

    def fidelity(attr: str) -> Optional[float]:
        values = [getattr(s, attr) for s in scores]
        return mean(values) if values and all(v is not None for v in values) else None

    summary: dict[str, Any] = {
        "mode": name,
        "ratio": mode_ratio(name),
        "samples": len(runs),
        "ttft_ms": ttft,
        "ttft_ms_median": statistics.median(ttfts) if ttfts else 0.0,
        "ttft_ms_p90": _percentile(ttfts, 90),
        "speedup_vs_full": (reference_ttft_ms / ttft) if reference_ttft_ms and ttft > 0 else None,
        "f1": mean(s.f1 for s in scores),
        "em": mean(s.em for s in scores),
        "first_token_agreement": fidelity("first_token_agreement"),
        "rougeL_vs_full": fidelity("rougeL_vs_full"),
        "recompute_fraction": mean(r.recompute_fraction for r in runs),
        "prompt_tokens": mean(r.prompt_tokens for r in runs),
        "prefix_hit_tokens": mean(r.prefix_hit_tokens for r in runs),
        "chunk_hit_tokens": mean(r.chunk_hit_tokens for r in runs),
        "reused_tokens": mean(r.reused_tokens for r in runs),
        "recomputed_reused_tokens": mean(r.recomputed_reused_tokens for r in runs),
        "answers": [r.answer for r in runs],
        "per_sample": [dict(asdict(s), ttft_ms=r.ttft_ms, latency_ms=r.latency_ms, raw_text=r.raw_text,
                            prompt_tokens=r.prompt_tokens, prefix_hit_tokens=r.prefix_hit_tokens,
                            chunk_hit_tokens=r.chunk_hit_tokens, reused_tokens=r.reused_tokens,
                            recomputed_reused_tokens=r.recomputed_reused_tokens,
                            recompute_fraction=r.recompute_fraction)
                       for r, s in zip(runs, scores)],
    }
    return summary


def summarize(runs_by_mode: Mapping[str, Sequence[ModeRun]], golds: Sequence[Sequence[str]],
              reference_mode: str = FULL_PREFILL) -> dict[str, dict[str, Any]]:
    """:func:`summarize_mode` for every mode, fidelity and speedup against ``reference_mode``."""
    reference = runs_by_mode.get(reference_mode)
    ref_ttft = mean(r.ttft_ms for r in reference) if reference else None
    return {name: summarize_mode(name, runs, golds, reference, ref_ttft) for name, runs in runs_by_mode.items()}


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column.startswith("ttft"):
            return f"{value:.1f}"
        if column in ("prompt_tokens", "prefix_hit_tokens", "chunk_hit_tokens", "reused_tokens",
                      "recomputed_reused_tokens"):
            return f"{value:.0f}"
        if column == "speedup_vs_full":
            return f"{value:.2f}x"
        if column == "ratio":
            return format(value, "g")
        return f"{value:.3f}"
    return str(value)


TABLE_COLUMNS = ("mode", "ttft_ms", "ttft_ms_median", "speedup_vs_full", "f1", "em", "first_token_agreement",
                 "rougeL_vs_full", "recompute_fraction", "prompt_tokens", "reused_tokens",
                 "recomputed_reused_tokens")
_SHORT = {"ttft_ms": "TTFT ms", "ttft_ms_median": "median", "speedup_vs_full": "speedup",
          "first_token_agreement": "1st tok", "rougeL_vs_full": "ROUGE-L", "recompute_fraction": "computed",
          "prompt_tokens": "prompt", "reused_tokens": "reused", "recomputed_reused_tokens": "recomp",
          "f1": "F1", "em": "EM"}


def format_table(modes: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS,
                 markdown: bool = False) -> str:
    """A fixed-width (or markdown) table, one row per mode, in the mapping's order."""
    header = [_SHORT.get(c, c) for c in columns]
    rows = [[_cell(summary.get(c), c) for c in columns] for summary in modes.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_csv(modes: Mapping[str, Mapping[str, Any]], path: "os.PathLike[str] | str",
              columns: Sequence[str] = SUMMARY_COLUMNS) -> None:
    """One row per mode with the aggregate columns (raw floats, empty for None)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for summary in modes.values():
            writer.writerow(["" if summary.get(c) is None else summary.get(c) for c in columns])


def write_samples_csv(modes: Mapping[str, Mapping[str, Any]], sample_ids: Sequence[str],
                      path: "os.PathLike[str] | str") -> None:
    """One row per (sample, mode): the per-request numbers behind the means."""
    fields = ("sample", "mode", "ttft_ms", "f1", "em", "first_token_agreement", "rougeL_vs_full",
              "recompute_fraction", "prompt_tokens", "reused_tokens", "recomputed_reused_tokens", "answer")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for name, summary in modes.items():
            for sid, answer, row in zip(sample_ids, summary["answers"], summary["per_sample"]):
                values = dict(row, sample=sid, mode=name, answer=answer)
                writer.writerow(["" if values.get(f) is None else values.get(f) for f in fields])


@dataclass
class PlotSeries:
    """What :func:`plot_modes` draws, split out so it can be checked without matplotlib."""

    ratios: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    rouge_l: list[Optional[float]] = field(default_factory=list)
    full_ttft_ms: Optional[float] = None
    full_f1: Optional[float] = None


def plot_series(modes: Mapping[str, Mapping[str, Any]]) -> PlotSeries:
    """Blend modes sorted by ratio, and the full-prefill level for reference lines."""
    series = PlotSeries()
    blend = sorted(((mode_ratio(n), s) for n, s in modes.items() if n.startswith(BLEND_PREFIX)
                    and mode_ratio(n) is not None), key=lambda item: item[0])
    for ratio, summary in blend:
        series.ratios.append(float(ratio))
        series.ttft_ms.append(float(summary["ttft_ms"]))
        series.f1.append(float(summary["f1"]))
        series.rouge_l.append(summary.get("rougeL_vs_full"))
    full = modes.get(FULL_PREFILL)
    if full is not None:
        series.full_ttft_ms, series.full_f1 = float(full["ttft_ms"]), float(full["f1"])
    return series


def plot_modes(modes: Mapping[str, Mapping[str, Any]], path: "os.PathLike[str] | str", title: str = "") -> bool:
    """Two panels against the Blend ratio: mean TTFT, and F1 vs gold with ROUGE-L vs
    the full-prefill answer (full prefill as dashed lines). Written as a PNG.

    Returns False, with a warning, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib); no plot written to %s", path)
        return False
    series = plot_series(modes)
    fig, (ax_t, ax_q) = plt.subplots(1, 2, figsize=(9, 3.6))
    if series.ratios:
        ax_t.plot(series.ratios, series.ttft_ms, marker="o", label="Blend")
        ax_q.plot(series.ratios, series.f1, marker="o", label="Blend F1 vs gold")
        if all(v is not None for v in series.rouge_l):
            ax_q.plot(series.ratios, series.rouge_l, marker="s", linestyle=":", label="Blend ROUGE-L vs full")
    if series.full_ttft_ms is not None:
        ax_t.axhline(series.full_ttft_ms, linestyle="--", color="gray", label="full prefill")
        ax_q.axhline(series.full_f1, linestyle="--", color="gray", label="full prefill F1")
    ax_t.set_ylabel("mean TTFT (ms)")
    ax_t.set_ylim(bottom=0)
    ax_q.set_ylabel("score")
    ax_q.set_ylim(0, 1.05)
    for ax in (ax_t, ax_q):
        ax.set_xlabel("recompute ratio")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = [
    "FULL_PREFILL", "ModeRun", "PlotSeries", "SampleScore", "SUMMARY_COLUMNS", "TABLE_COLUMNS", "clean_answer",
    "format_table", "mode_name", "mode_ratio", "plot_modes", "plot_series", "score_run", "summarize",
    "summarize_mode", "write_csv", "write_samples_csv",
]
