"""The example's rag_eval.report: mode names, per-run accounting, aggregates, table, CSV and plot."""

from __future__ import annotations

import csv
import json

import pytest

from rag_eval.report import (
    FULL_PREFILL,
    ModeRun,
    clean_answer,
    format_table,
    mode_name,
    mode_ratio,
    plot_modes,
    plot_series,
    summarize,
    summarize_mode,
    write_csv,
    write_samples_csv,
)

REQUIRED = ("ttft_ms", "f1", "em", "first_token_agreement", "rougeL_vs_full", "recompute_fraction", "answers")


def test_mode_names_use_format_g():
    assert [mode_name(r) for r in (0, 0.0, 0.15, 1, 1.0, 0.5)] == [
        "blend_0", "blend_0", "blend_0.15", "blend_1", "blend_1", "blend_0.5"]
    assert mode_ratio("blend_0.15") == 0.15
    assert mode_ratio(FULL_PREFILL) == 1.0
    assert mode_ratio("blend_x") is None and mode_ratio("other") is None


def test_clean_answer_keeps_first_nonempty_line():
    assert clean_answer("\n  Paris \nbecause it is the capital") == "Paris"
    assert clean_answer("   ") == ""


def _run(answer: str, ids: list[int], ttft: float, **stats) -> ModeRun:
    return ModeRun.from_stats(answer, ids, ttft, stats.pop("prompt_tokens", 100), stats)


def test_recompute_fraction_counts_prefix_and_reused_tokens():
    full = _run("x", [1], 10.0)
    assert full.computed_tokens == 100 and full.recompute_fraction == 1.0
    blend = _run("x", [1], 5.0, prefix_hit_tokens=16, chunk_hit_tokens=64, reused_tokens=54,
                 recomputed_reused_tokens=10)
    assert blend.computed_tokens == 100 - 16 - 54
    assert blend.recompute_fraction == pytest.approx(0.30)
    # Missing or None stats (no connector) count as nothing reused.
    assert ModeRun.from_stats("x", [1], 1.0, 50, {"reused_tokens": None}).recompute_fraction == 1.0
    assert ModeRun.from_stats("x", [1], 1.0, 0, {}).recompute_fraction == 0.0


def _modes() -> dict[str, list[ModeRun]]:
    return {
        FULL_PREFILL: [_run("Paris", [5, 6], 100.0), _run("blue whale", [7], 300.0)],
        "blend_0": [_run("London", [8, 6], 20.0, reused_tokens=80),
                    _run("the blue whale", [7, 9], 40.0, reused_tokens=80)],
        "blend_1": [_run("Paris", [5, 6], 90.0, recomputed_reused_tokens=80),
                    _run("blue whale", [7], 310.0, recomputed_reused_tokens=80)],
    }


GOLDS = [["Paris"], ["Blue Whale", "the blue whale"]]


def test_summarize_scores_against_gold_and_full_prefill():
    modes = summarize(_modes(), GOLDS)
    assert list(modes) == [FULL_PREFILL, "blend_0", "blend_1"]
    for summary in modes.values():
        for key in REQUIRED:
            assert key in summary
        assert len(summary["answers"]) == 2 and len(summary["per_sample"]) == 2
    full, b0, b1 = modes[FULL_PREFILL], modes["blend_0"], modes["blend_1"]
    assert full["f1"] == 1.0 and full["em"] == 1.0
    assert full["first_token_agreement"] == 1.0 and full["rougeL_vs_full"] == 1.0
    assert full["ttft_ms"] == 200.0 and full["speedup_vs_full"] == 1.0
    assert b0["em"] == 0.5  # "the blue whale" normalizes to a gold answer; London does not
    assert b0["first_token_agreement"] == 0.5  # [8, ...] vs [5, ...]; [7, ...] vs [7]
    assert b0["ttft_ms"] == 30.0 and b0["speedup_vs_full"] == pytest.approx(200.0 / 30.0)
    assert b0["recompute_fraction"] == pytest.approx(0.2)
    assert b0["ratio"] == 0.0 and b1["ratio"] == 1.0
    assert b1["answers"] == full["answers"] and b1["recompute_fraction"] == 1.0
    assert b1["ttft_ms_p90"] == 310.0 and b1["ttft_ms_median"] == 200.0
    json.dumps(modes)  # the whole summary is JSON-ready


def test_summarize_without_reference_leaves_fidelity_empty():
    modes = summarize({"blend_0": _modes()["blend_0"]}, GOLDS)
    assert modes["blend_0"]["first_token_agreement"] is None
    assert modes["blend_0"]["rougeL_vs_full"] is None
    assert modes["blend_0"]["speedup_vs_full"] is None


def test_summarize_mode_checks_lengths():
    with pytest.raises(ValueError):
        summarize_mode("blend_0", _modes()["blend_0"], GOLDS[:1])


def test_table_and_csv(tmp_path):
    modes = summarize(_modes(), GOLDS)
    table = format_table(modes)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith(FULL_PREFILL)
    assert "TTFT ms" in lines[0] and "6.67x" in table
    md = format_table(modes, markdown=True)
    assert md.splitlines()[0].startswith("| mode |") and md.count("\n") == 4

    write_csv(modes, tmp_path / "summary.csv")
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["mode"] for r in rows] == list(modes)
    assert float(rows[1]["ttft_ms"]) == 30.0
    write_samples_csv(modes, ["q1", "q2"], tmp_path / "samples.csv")
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert len(rows) == 6 and rows[0]["sample"] == "q1" and rows[3]["answer"] == "the blue whale"


def test_plot_series_sorts_blend_modes_by_ratio():
    modes = summarize(dict(reversed(list(_modes().items()))), GOLDS)
    series = plot_series(modes)
    assert series.ratios == [0.0, 1.0]
    assert series.ttft_ms == [30.0, 200.0]
    assert series.full_ttft_ms == 200.0 and series.full_f1 == 1.0


def test_plot_writes_png(tmp_path):
    path = tmp_path / "plot.png"  # matplotlib comes with the "bench" extra
    assert plot_modes(summarize(_modes(), GOLDS), path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_returns_false(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_modes(summarize(_modes(), GOLDS), tmp_path / "plot.png") is False
    assert not (tmp_path / "plot.png").exists()


def test_report_module_does_not_import_vllm():
    import subprocess
    import sys

    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    code = ("import sys; sys.path.insert(0, %r); import rag_eval.report; "
            "assert 'vllm' not in sys.modules and 'matplotlib' not in sys.modules" % str(examples))
    subprocess.run([sys.executable, "-c", code], check=True)
