"""packed_attention's choice of path and the equal-documents path against the dense reference (CPU, fp32)."""
from __future__ import annotations

import torch

from tests.train.triton_models import packed_batch
from tunedag.models.packed_attention import PackedSequences, dense_packed_attention, equal_docs_attention

CPU = torch.device("cpu")


def _seq(rows) -> PackedSequences:
    batch = packed_batch(rows=rows)  # padded to the longest row
    return PackedSequences.from_batch(batch["segment_ids"], batch["position_ids"], CPU)


def test_doc_len_is_set_only_when_every_document_has_one_length():
    equal = _seq(((37, 37), (37,)))
    assert equal.doc_len == 37 and equal.n_tokens == 111
    mixed = _seq(((37, 36), (37,)))
    assert mixed.doc_len is None and mixed.max_len == 37


def test_equal_docs_attention_matches_the_dense_reference_forward_and_backward():
    """Three documents of 37 tokens (not a block multiple), 8 query heads over 2 key/value heads."""
    seq = _seq(((37, 37), (37,)))
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
