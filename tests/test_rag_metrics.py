"""Metrics against hand-computed values (SQuAD normalisation, F1, EM, ROUGE-L)."""

import pytest

from rag_eval.metrics import (
    exact_match,
    f1_score,
    first_token_agreement,
    lcs_length,
    mean,
    normalize_answer,
    rouge_l,
)


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    # "the" inside a word is not an article.
    assert normalize_answer("Theatre other") == "theatre other"


def test_exact_match_uses_normalisation_and_any_gold():
    assert exact_match("The Beatles.", ["beatles"]) == 1.0
    assert exact_match("Beatles", ["Rolling Stones", "the beatles"]) == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0
    assert exact_match("x", []) == 0.0


def test_f1_hand_computed():
    # pred: [new, york, city]; gold: [new, york] -> overlap 2, P=2/3, R=1, F1=0.8.
    assert f1_score("New York City", "New York") == pytest.approx(0.8)
    # Repeated tokens count with multiplicity: pred [a1, a1, b], gold [a1, b, c]
    # -> overlap {a1:1, b:1}=2, P=2/3, R=2/3, F1=2/3.
    assert f1_score("a1 a1 b", "a1 b c") == pytest.approx(2 / 3)
    assert f1_score("nothing shared", "other words") == 0.0


def test_f1_takes_best_gold():
    assert f1_score("1970s and 1980s", ["1980s", "1970s and 1980s"]) == 1.0
    # vs "1980s": overlap 1, P=1/3, R=1 -> 0.5; vs "1970s": same 0.5.
    assert f1_score("1970s and 1980s", ["1980s", "1970s"]) == pytest.approx(0.5)
    assert f1_score("anything", []) == 0.0


def test_f1_empty_conventions():
    assert f1_score("", "") == 1.0
    assert f1_score("the", "") == 1.0  # normalizes to empty on both sides
    assert f1_score("", "Paris") == 0.0


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # classic CLRS example
    assert lcs_length([], [1, 2]) == 0
    assert lcs_length([1, 2, 3], [1, 2, 3]) == 3


def test_rouge_l_hand_computed():
    # pred [police, killed, gunman], ref [police, kill, gunman]: LCS 2, P=R=2/3.
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # pred [a1, b1], ref [a1, c1, b1, d1]: LCS 2, P=1, R=0.5, F=2*0.5/1.5=2/3.
    assert rouge_l("a1 b1", "a1 c1 b1 d1") == pytest.approx(2 / 3)
    # Order matters for LCS (unlike F1): [x, y] vs [y, x] -> LCS 1, P=R=0.5.
    assert rouge_l("x y", "y x") == pytest.approx(0.5)
    assert f1_score("x y", "y x") == 1.0
    assert rouge_l("same words here", "Same words, here.") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("word", "") == 0.0
    assert rouge_l("one", "two") == 0.0


def test_rouge_l_beta_weights_recall():
    # P=1, R=0.5; beta=2: (1+4)*0.5 / (0.5 + 4*1) = 2.5/4.5.
    assert rouge_l("a1 b1", "a1 c1 b1 d1", beta=2.0) == pytest.approx(2.5 / 4.5)


def test_first_token_agreement():
    assert first_token_agreement([5, 6, 7], [5, 9]) == 1.0
    assert first_token_agreement([5], [6, 5]) == 0.0
    assert first_token_agreement([], []) == 1.0
    assert first_token_agreement([], [1]) == 0.0


def test_mean():
    assert mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    assert mean([]) == 0.0
