"""Packed attention with attention sinks (gpt-oss) against the float64 reference, forward and backward.

Awkward shapes: token counts that are not multiples of the kernel's block, several packed documents
(one shorter than a block, one spanning blocks), GQA, head_dim below the dot's 16 columns, a sliding
window shorter than a document. The sink's gradient is compared too, and with large sinks the
outputs shrink (the sink takes most of the softmax) so a sink that is ignored fails.
"""
import pytest
import torch

from closeness import DEVICE, FP32, Tol, assert_matches, rand

# (document lengths, q heads, kv heads, head_dim, window)
CASES = [
    ((5, 23, 1, 9), 4, 2, 8, None),  # 38 tokens, a one-token document, GQA 2:1, D < 16
    ((37,), 2, 2, 24, 6),  # one document over three blocks, a window, D not a power of 2
    ((3, 17, 12), 6, 2, 16, 4),  # GQA 3:1, window shorter than every long document
]
# bfloat16 tiles and one bfloat16 cast of each output; the inputs are rounded to bfloat16 first
BF16_ATTENTION = Tol(rel=2e-2, rtol=5e-2, atol_frac=5e-2)


def _docs(lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return doc.to(DEVICE), cu.to(DEVICE)


def _check(lengths, hq, hk, d, window, dtype, tol, sink_scale=1.0):
    from tunedag.kernels.sink_attention import sink_attention, sink_attention_reference

    torch.manual_seed(0)
    n = sum(lengths)
    q, k, v = (rand((n, h, d), dtype, DEVICE, requires_grad=True) for h in (hq, hk, hk))
    sinks = rand((hq,), torch.float32, DEVICE, scale=sink_scale, requires_grad=True)
    doc, cu = _docs(lengths)
    scale = d**-0.5
    out = sink_attention(q, k, v, sinks, doc, cu, scale, window)
    g = rand(out.shape, dtype, DEVICE)
    grads = torch.autograd.grad(out, [q, k, v, sinks], g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = sink_attention_reference(*leaves, doc, scale, window)
    grads_ref = torch.autograd.grad(ref, leaves, g.double())
    assert out.dtype == dtype
    assert_matches(out, ref, tol, "out")
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
        assert_matches(got, want, tol, name)
    return out, ref


@pytest.mark.parametrize("lengths,hq,hk,d,window", CASES)
def test_sink_attention_matches_reference(lengths, hq, hk, d, window):
    _check(lengths, hq, hk, d, window, torch.float32, FP32)


def test_sink_attention_bf16():
    _check((5, 23, 1, 9), 4, 2, 8, 7, torch.bfloat16, BF16_ATTENTION)


def test_large_sinks_take_the_softmax():
    """Sinks around e^4 change the output far beyond the tolerance: a kernel ignoring them fails above."""
    from tunedag.kernels.sink_attention import sink_attention_reference

    out, _ = _check((9, 20), 2, 1, 8, None, torch.float32, FP32, sink_scale=4.0)
    torch.manual_seed(0)  # _check's inputs again, with sinks that take no share of the softmax
    q, k, v = (rand((29, h, 8), torch.float32, DEVICE).double() for h in (2, 1, 1))
    doc, _ = _docs((9, 20))
    silent = torch.full((2,), -1e4, dtype=torch.float64, device=DEVICE)
    no_sink = sink_attention_reference(q, k, v, silent, doc, 8**-0.5)
    assert (out.double() - no_sink).norm() > 0.1 * no_sink.norm()


def test_sink_attention_refuses_bad_shapes():
    from tunedag.kernels.sink_attention import sink_attention

    q, k = torch.zeros(4, 3, 8), torch.zeros(4, 2, 8)
    doc, cu = _docs((4,))
    with pytest.raises(ValueError, match="Hq a multiple of Hk"):
        sink_attention(q, k, k, torch.zeros(3), doc, cu, 1.0)
    with pytest.raises(ValueError, match="one logit per query head"):
        sink_attention(torch.zeros(4, 2, 8), k, k, torch.zeros(3), doc, cu, 1.0)
