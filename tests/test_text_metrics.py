"""Answer scores on hand-made pairs, each value worked out by hand."""
import pytest

from tunedag.evaluate.text_metrics import exact_match, rouge_l, score_answers, token_f1


@pytest.mark.parametrize("prediction, reference, expected", [
    ("owl", "owl", True), (" owl \n", "owl", True), ("owl cat", "owl  cat", True),
    ("owls", "owl", False), ("", "owl", False), ("Owl", "owl", False),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat", "the cat sat", 0.8),           # P = 2/2, R = 2/3 → 2·1·(2/3)/(5/3) = 0.8
    ("cat the", "the cat sat", 0.8),           # order does not matter to F1
    ("the the the", "the cat", 0.4),           # overlap min(3, 1) = 1: P = 1/3, R = 1/2 → 0.4
    ("dog", "the cat", 0.0),
    ("", "", 1.0),
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("a b c d", "a b c d", 1.0),
    ("a c d", "a b c d", 6 / 7),               # LCS "a c d" = 3: P = 1, R = 3/4 → 6/7
    ("d c b a", "a b c d", 0.25),              # LCS 1: P = R = 1/4
    ("b a", "a b", 0.5),                       # LCS 1 of 2: order matters to ROUGE-L, not to F1
    ("x y", "a b", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_score_answers_averages_over_pairs():
    scores = score_answers(["owl", "the cat"], ["owl", "the cat sat"])
    assert scores == pytest.approx({"exact_match": 0.5, "token_f1": 0.9, "rouge_l": 0.9})
