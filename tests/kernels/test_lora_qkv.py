"""LoRA-fused Q/K/V and O projections against eager peft-style LoRA: outputs and all grads."""
import pytest
import torch

from closeness import leaf32, rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "q_a", "q_b", "k_a", "k_b", "v_a", "v_b")


def make(n, h, outs, r, dtype, ab_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(DEV, dtype).requires_grad_()
    ws, ab = [], []
    for o in outs:
        ws.append((torch.randn(o, h, generator=g) / h**0.5).to(DEV, dtype))
        for t in (torch.randn(r, h, generator=g) / h**0.5, torch.randn(o, r, generator=g) / r**0.5):
            ab.append(t.to(DEV, ab_dtype or dtype).requires_grad_())
    return x, ws, ab


def qkv_args(x, ws, ab):
    return (x, ws[0], ab[0], ab[1], ws[1], ab[2], ab[3], ws[2], ab[4], ab[5])


def fwd_bwd_qkv(fn, x, ws, ab, scaling, seed=1):
    for t in [x, *ab]:
        t.grad = None
    outs = fn(*qkv_args(x, ws, ab), scaling)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs], [t.grad.detach().clone() for t in [x, *ab]]


def fwd_bwd_o(fn, x, w, a, b, scaling, seed=2):
    for t in (x, a, b):
        t.grad = None
    out = fn(x, w, a, b, scaling)
    g = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return out.detach(), [t.grad.detach().clone() for t in (x, a, b)]


@pytest.mark.parametrize("n,h,outs,r", [(13, 32, (32, 16, 16), 4), (1, 24, (24, 8, 8), 2)])
def test_qkv_fp32_matches_reference(n, h, outs, r):
    from tunedag.kernels.lora_qkv import lora_qkv, lora_qkv_reference

    x, ws, ab = make(n, h, outs, r, torch.float32)
    got, grads = fwd_bwd_qkv(lora_qkv, x, ws, ab, 2.0)
    ref, grads_ref = fwd_bwd_qkv(lora_qkv_reference, x, ws, ab, 2.0)
    assert [o.shape[-1] for o in got] == list(outs)
    # fp32 on both sides; only the order of additions differs (~1e-7 measured).
    for o, o_ref in zip(got, ref):
        assert rel(o, o_ref) < 1e-5
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk, gr) < 1e-5, name
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-5, msg=name)


def test_qkv_bf16_with_fp32_adapters_against_fp32_reference():
    from tunedag.kernels.lora_qkv import lora_qkv, lora_qkv_reference

    x, ws, ab = make(21, 48, (48, 16, 16), 8, torch.bfloat16, ab_dtype=torch.float32, seed=3)
    x3 = x.detach().reshape(3, 7, 48).requires_grad_()
    got, grads = fwd_bwd_qkv(lora_qkv, x3, ws, ab, 0.5)
    assert got[1].shape == (3, 7, 16)
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    ref, grads_ref = fwd_bwd_qkv(lora_qkv_reference, leaf32(x3), [w.float() for w in ws],
                                 [leaf32(t) for t in ab], 0.5)
    # One projection: its operands and outputs are rounded to bf16 (2^-9 = 0.2% each);
    # 0.24-0.40% measured (eager peft, LoRA path in fp32: 0.14-0.38%); a wrong term is >5%.
    for o, o_ref in zip(got, ref):
        assert rel(o.float(), o_ref) < 1e-2
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk.float(), gr) < 1e-2, name


def test_qkv_nf4_base_matches_reference_on_dequantised_weights():
    from tunedag.kernels.lora_qkv import lora_qkv, lora_qkv_reference
    from tunedag.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference

    x, ws, ab = make(9, 64, (64, 32, 32), 4, torch.float32, seed=4)
    qs = [quantize_nf4_reference(w) for w in ws]
    got, grads = fwd_bwd_qkv(lora_qkv, x, qs, ab, 2.0)
    ref, grads_ref = fwd_bwd_qkv(lora_qkv_reference, x, [dequantize_nf4_reference(q) for q in qs],
                                 ab, 2.0)
    # The Triton dequantiser is exact, so both sides see the same fp32 weights.
    for o, o_ref in zip(got, ref):
        assert rel(o, o_ref) < 1e-5
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk, gr) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True])
def test_o_projection(dtype, nf4):
    from tunedag.kernels.lora_qkv import lora_o, lora_o_reference
    from tunedag.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference

    x, ws, ab = make(17, 64, (40,), 4, dtype, ab_dtype=torch.float32, seed=6)
    w = quantize_nf4_reference(ws[0]) if nf4 else ws[0]
    got, grads = fwd_bwd_o(lora_o, x, w, ab[0], ab[1], 1.5)
    w_dense = dequantize_nf4_reference(w, torch.float32) if nf4 else ws[0].float()
    ref, grads_ref = fwd_bwd_o(lora_o_reference, leaf32(x), w_dense, leaf32(ab[0]),
                               leaf32(ab[1]), 1.5)
    # fp32: summation order only. bf16: one rounded projection, as in the QKV test.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (17, 40)
    assert rel(got.float(), ref) < tol
    for gk, gr in zip(grads, grads_ref):
        assert rel(gk.float(), gr) < tol


def _masters(ws, trained):
    """fp32 master copies of the base weights; those in ``trained`` require grad."""
    return [w.detach().float().requires_grad_(i in trained) for i, w in enumerate(ws)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_trained_base_weights_get_their_gradients(dtype, adapters):
    """Q and V weights trained, K frozen (as unfrozen_parameters may leave it), fp32 masters under
    x in ``dtype``; with no adapters (full fine-tuning) or with LoRA beside them. Then O alone."""
    from tunedag.kernels.lora_qkv import lora_o, lora_o_reference, lora_qkv, lora_qkv_reference

    x, ws, ab = make(11, 24, (24, 8, 8), 2, dtype, ab_dtype=torch.float32, seed=7)
    ab = ab if adapters else [None] * 6
    masters = _masters(ws, trained=(0, 2))
    x32, ws32 = leaf32(x), [leaf32(m) if m.requires_grad else m.detach() for m in masters]
    outs = lora_qkv(*qkv_args(x, masters, ab), 2.0)
    refs = lora_qkv_reference(*qkv_args(x32, ws32, [leaf32(t) for t in ab]), 2.0)
    g = torch.Generator().manual_seed(8)
    dys = [torch.randn(o.shape, generator=g).to(DEV) for o in refs]
    torch.autograd.backward(outs, [d.to(dtype) for d in dys])
    torch.autograd.backward(refs, dys)
    # fp32: summation order only; bf16: one rounded projection (as in the bf16 QKV test above)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert masters[1].grad is None  # the frozen K weight: no gradient work
    for i in (0, 2):
        assert masters[i].grad.dtype == torch.float32
        assert rel(masters[i].grad, ws32[i].grad) < tol, i
    assert rel(x.grad.float(), x32.grad) < tol

    o_w = _masters(ws[:1], trained=(0,))[0]
    o_ref = leaf32(o_w)
    lora_o(x.detach(), o_w, *ab[:2], 0.5).backward(dys[0].to(dtype))
    lora_o_reference(x32.detach(), o_ref, *(leaf32(t) for t in ab[:2]), 0.5).backward(dys[0])
    assert rel(o_w.grad, o_ref.grad) < tol


def test_adapters_for_some_projections_only_are_refused():
    from tunedag.kernels.lora_qkv import lora_o, lora_qkv

    x, ws, ab = make(4, 16, (16, 8, 8), 2, torch.float32)
    with pytest.raises(ValueError, match="every projection of the call, or for none"):
        lora_qkv(*qkv_args(x, ws, [ab[0], ab[1], None, None, ab[4], ab[5]]), 1.0)
    with pytest.raises(ValueError, match="or for none"):
        lora_o(x, ws[1], ab[0], None, 1.0)
