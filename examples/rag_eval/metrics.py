"""Answer-quality and fidelity metrics for the Blend example.

* Quality against gold answers: SQuAD-style ``exact_match`` and token ``f1_score``
  after :func:`normalize_answer` (lower case, no punctuation, no articles
  a/an/the, single spaces), maximised over the gold answers, as HotpotQA and
  LongBench score them.
* Fidelity to the full-prefill answer (does Blend change what the model says?):
  :func:`rouge_l`, the LCS-based F-measure on normalized tokens, and
  :func:`first_token_agreement`, whether the first generated token ids match,
  the most sensitive signal of a changed next-token distribution.

Pure Python, written here rather than taken from a rouge package so the numbers
do not depend on that package's tokenizer or stemming.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence, Union

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)

Golds = Union[str, Iterable[str]]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: Golds) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        # Both empty counts as a match (SQuAD v2 convention); one empty scores 0.
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Golds) -> float:
    """Token F1 of ``prediction`` against the best-matching gold answer (0 if none)."""
    gold_list = _as_list(golds)
    if not gold_list:
        return 0.0
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1_tokens(pred_tokens, normalize_answer(g).split()) for g in gold_list)


def exact_match(prediction: str, golds: Golds) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(golds)))


def lcs_length(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure on normalized word tokens.

    ``P = LCS/len(pred)``, ``R = LCS/len(ref)``, ``F = (1+b^2)PR / (R + b^2 P)``;
    ``beta=1`` is the plain F1 most reports use. Two empty strings score 1.0.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    b2 = beta * beta
    return (1 + b2) * precision * recall / (recall + b2 * precision)


def first_token_agreement(a_ids: Sequence[int], b_ids: Sequence[int]) -> float:
    """1.0 if both generations start with the same token id, else 0.0.

    Two empty generations agree; one empty and one not do not.
    """
    if not a_ids or not b_ids:
        return float(not a_ids and not b_ids)
    return float(a_ids[0] == b_ids[0])


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean, 0.0 for no values (an empty run reports zeros, not NaN)."""
    items = list(values)
    return sum(items) / len(items) if items else 0.0
