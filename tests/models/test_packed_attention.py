"""packed_attention's choice of path and the equal-documents path against the dense reference (CPU, fp32)."""
from __future__ import annotations

import torch

from tunedag.models.packed_attention import PackedSequences, dense_packed_attention, equal_docs_attention

CPU = torch.device("cpu")


def _segments(rows, width):
    """(B, T) segment ids and positions for rows of documents of the given lengths, padded to ``width``."""
    seg = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for r, lengths in enumerate(rows):
        at = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, at:at + n], pos[r, at:at + n] = s, torch.arange(n)
            at += n
    return seg, pos


def test_doc_len_is_set_only_when_every_document_has_one_length():
    equal = PackedSequences.from_batch(*_segments([(37, 37), (37,)], 80), CPU)
    assert equal.doc_len == 37 and equal.n_tokens == 111
    mixed = PackedSequences.from_batch(*_segments([(37, 36), (37,)], 80), CPU)
    assert mixed.doc_len is None and mixed.max_len == 37


def test_equal_docs_attention_matches_the_dense_reference_forward_and_backward():
    """Three documents of 37 tokens (not a block multiple), 8 query heads over 2 key/value heads."""
    seq = PackedSequences.from_batch(*_segments([(37, 37), (37,)], 80), CPU)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(111, h, 16, generator=gen, dtype=torch.float64) for h in (8, 2, 2))
    grad = torch.randn(111, 8, 16, generator=gen, dtype=torch.float64)
    results = []
    for attend in (lambda *x: equal_docs_attention(*x, 37, 0.25),
                   lambda *x: dense_packed_attention(*x, seq, 0.25).double()):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*xs)
        out.backward(grad)
        results.append([out.detach()] + [x.grad for x in xs])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
