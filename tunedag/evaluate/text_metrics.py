"""Scores of a generated answer against its reference: exact match, token F1, ROUGE-L.

Answers are compared after normalising white space; F1 and ROUGE-L work on white-space tokens
(case-sensitive), as SQuAD-style F1 and ROUGE-L's F-measure define them.
"""
from __future__ import annotations

from collections import Counter


def _tokens(text: str) -> list[str]:
    return text.split()


def exact_match(prediction: str, reference: str) -> bool:
    return _tokens(prediction) == _tokens(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of tokens, with counts)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common token subsequence over both lengths (beta = 1)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_answers(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over answer pairs."""
    n = len(references)
    if n == 0:
        return {}
    pairs = list(zip(predictions, references))
    return {"exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
            "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n}
