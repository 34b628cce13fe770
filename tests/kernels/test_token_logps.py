"""Fused per-token log-probs (preference training) against the eager reference, forward and backward.

The upstream gradient is random per token, as DPO's is (each token weighted by its sequence's
coefficient): a kernel that applied one scale to all rows, or dropped a row's, fails here.
"""
import pytest
import torch
import torch.nn.functional as F

from closeness import FP32, assert_matches, leaf32, poisoned_allocations, rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(n, h, v, dtype, bias, train_head, ignore_rows=(), seed=0, logit_scale=6.0):
    """hidden, weight, bias (trained with the head), targets, per-token upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (logit_scale / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignore_rows)] = -100
    up = torch.randn(n, generator=g)
    cast = lambda x, grad: None if x is None else x.to(DEV, dtype).requires_grad_(grad)  # noqa: E731
    return cast(hid, True), cast(w, train_head), cast(b, train_head), t.to(DEV), up.to(DEV)


def run(fn, hid, w, b, t, up, **kw):
    for x in (hid, w, b):
        if x is not None:
            x.grad = None
    out = fn(hid, w, t, b, **kw)
    (out * up).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in (hid, w, b)]


@pytest.mark.parametrize(
    "n,h,v,chunk,bias,train_head,softcap,ignore",
    [
        (37, 32, 1000, 8, False, False, None, (3, 10, 11)),  # frozen head: 5 chunks, the last partial
        (37, 32, 1000, 16, True, True, 3.0, (0, 36)),  # trained head and bias, softcapping bites
        (20, 24, 333, 7, False, True, 2.0, tuple(range(7, 14))),  # trained head, a whole chunk ignored
        (1, 16, 257, None, True, False, None, ()),  # a single row, frozen bias, V = 257
    ],
)
def test_fp32_matches_reference(n, h, v, chunk, bias, train_head, softcap, ignore):
    from tunedag.kernels.cross_entropy import fused_linear_token_logps, fused_linear_token_logps_reference

    hid, w, b, t, up = make(n, h, v, torch.float32, bias, train_head, ignore)
    with poisoned_allocations():  # any row or gradient element left unwritten stays NaN
        out, grads = run(fused_linear_token_logps, hid, w, b, t, up, softcap=softcap, chunk_rows=chunk)
    ref, ref_grads = run(fused_linear_token_logps_reference, hid, w, b, t, up, softcap=softcap)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert_matches(out, ref, FP32, "log-probs")
    for name, gk, gr in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert (gk is None) == (gr is None), name
        if gr is not None:
            assert_matches(gk, gr, FP32, f"grad {name}")
    for i in ignore:  # ignored tokens: log-prob 0, no gradient
        assert out[i] == 0 and torch.count_nonzero(grads[0][i]) == 0


@pytest.mark.parametrize("train_head", [False, True])
def test_bf16_against_fp32_reference(train_head):
    from tunedag.kernels.cross_entropy import fused_linear_token_logps, fused_linear_token_logps_reference

    hid, w, b, t, up = make(45, 64, 1531, torch.bfloat16, True, train_head, (2, 44), seed=1)
    out, grads = run(fused_linear_token_logps, hid, w, b, t, up, softcap=3.0, chunk_rows=16)
    ref, ref_grads = run(fused_linear_token_logps_reference, leaf32(hid), leaf32(w) if train_head else w.float(),
                         leaf32(b) if train_head else b.float(), t, up, softcap=3.0)
    # Logits rounded once to bf16 (as eager lm_head(h).float()), by up to 2^-8 of their size (~3
    # after the cap) against log-probs of ~-8, errors of both signs: 1.3e-4 measured.
    assert rel(out, ref) < 1e-3
    # Each softmax probability moves by up to ~1% (tests/kernels/test_cross_entropy.py); 0.2-0.4%
    # measured over the whole gradients, the frozen head's grad_h rounded once more by the upstream.
    for gk, gr in zip(grads, ref_grads):
        if gr is not None:
            assert gk.dtype == torch.bfloat16
            assert rel(gk.float(), gr) < 1e-2


def _saved_tensors(fn):
    """(result, numel of every tensor autograd saved while fn ran)."""
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, saved


def test_no_grad_saves_nothing_and_frozen_head_saves_one_hidden_sized_tensor():
    from tunedag.kernels.cross_entropy import fused_linear_token_logps

    n, h, v = 30, 16, 500
    hid, w, _, t, _ = make(n, h, v, torch.float32, False, False, (4,), seed=2)
    with torch.no_grad():  # the reference model's pass
        ref_pass, saved = _saved_tensors(lambda: fused_linear_token_logps(hid, w, t, chunk_rows=8))
    assert saved == [] and ref_pass.grad_fn is None
    policy, saved = _saved_tensors(lambda: fused_linear_token_logps(hid, w, t, chunk_rows=8))
    assert saved == [n * h]  # d logp / d h, never (N, V) logits
    assert torch.equal(policy.detach(), ref_pass)


def test_linear_head_in_token_logps_equals_the_chunked_pytorch_path():
    """models.logprobs.token_logps: a LinearHead (the triton engine) gives the callable head's results."""
    from tunedag.models.logprobs import LinearHead, token_logps

    hid, w, b, t, up = make(23, 16, 300, torch.float32, True, True, seed=3)
    got, got_grads = run(lambda *a, **k: token_logps(a[0], a[2], LinearHead(a[1], a[3]), **k), hid, w, b, t, up,
                         softcap=2.5)
    want, want_grads = run(lambda *a, **k: token_logps(a[0], a[2], lambda x: F.linear(x, a[1], a[3]), **k),
                           hid, w, b, t, up, softcap=2.5, chunk_tokens=8)
    assert_matches(got, want, FP32, "log-probs")
    for name, gk, gr in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert_matches(gk, gr, FP32, f"grad {name}")


def test_bad_arguments_name_the_problem():
    from tunedag.kernels.cross_entropy import fused_linear_token_logps

    hid, w, _, t, _ = make(6, 8, 40, torch.float32, False, False)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_token_logps(hid, w, t[:5])
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_token_logps(hid[:, :4], w, t)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_token_logps(hid, w, t, softcap=0.0)
