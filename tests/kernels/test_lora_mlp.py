"""LoRA-fused gated MLP against eager peft-style LoRA: output and the grads of x and A/B."""
import pytest
import torch

from closeness import leaf32, rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def make(n, h, i, r, dtype, ab_dtype=None, seed=0):
    """x (n, h); dense W's; random A and B (B non-zero so the LoRA path matters)."""
    g = torch.Generator().manual_seed(seed)
    ab_dtype = ab_dtype or dtype
    x = torch.randn(n, h, generator=g)
    ws = [torch.randn(o, k, generator=g) / k**0.5 for o, k in ((i, h), (i, h), (h, i))]
    abs_ = []
    for o, k in ((i, h), (i, h), (h, i)):
        abs_ += [torch.randn(r, k, generator=g) / k**0.5, torch.randn(o, r, generator=g) / r**0.5]
    x = x.to(DEV, dtype).requires_grad_()
    ws = [w.to(DEV, dtype) for w in ws]
    abs_ = [t.to(DEV, ab_dtype).requires_grad_() for t in abs_]
    return x, ws, abs_


def args(x, ws, ab):
    return (x, ws[0], ab[0], ab[1], ws[1], ab[2], ab[3], ws[2], ab[4], ab[5])


def forward_backward(fn, x, ws, ab, scaling, activation, seed=1):
    for t in [x, *ab]:
        t.grad = None
    y = fn(*args(x, ws, ab), scaling, activation)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad.detach().clone() for t in [x, *ab]]


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("n,h,i,r", [(13, 24, 40, 4), (1, 16, 48, 8)])
def test_fp32_dense_matches_reference(activation, n, h, i, r):
    from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    x, ws, ab = make(n, h, i, r, torch.float32)
    y, grads = forward_backward(lora_mlp, x, ws, ab, 2.0, activation)
    y_ref, grads_ref = forward_backward(lora_mlp_reference, x, ws, ab, 2.0, activation)
    # fp32 everywhere; only the order of additions differs (~1e-7 measured).
    assert rel(y, y_ref) < 1e-5
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk, gr) < 1e-5, name
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_bf16_with_fp32_adapters_against_fp32_reference(activation):
    from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    # bf16 activations and base weights, fp32 adapters (peft's default), a (2, 7, H) input.
    x, ws, ab = make(14, 32, 56, 8, torch.bfloat16, ab_dtype=torch.float32, seed=3)
    x3 = x.detach().reshape(2, 7, 32).requires_grad_()
    y, grads = forward_backward(lora_mlp, x3, ws, ab, 0.5, activation)
    assert y.shape == (2, 7, 32) and y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    x32, ab32 = leaf32(x3), [leaf32(t) for t in ab]
    y_ref, grads_ref = forward_backward(lora_mlp_reference, x32, [w.float() for w in ws], ab32,
                                        0.5, activation)
    # Every matmul operand and output is rounded to bf16 (2^-9 = 0.2% each); through three
    # chained projections 0.5-0.6% measured, eager peft in bf16 0.4-0.6%; a wrong term is >5%.
    assert rel(y.float(), y_ref) < 1.5e-2
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk.float(), gr) < 1.5e-2, name


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_nf4_base_matches_reference_on_dequantised_weights(activation):
    from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference
    from tunedag.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference

    x, ws, ab = make(11, 64, 96, 4, torch.float32, seed=5)
    qs = [quantize_nf4_reference(w) for w in ws]
    dense = [dequantize_nf4_reference(q) for q in qs]
    y, grads = forward_backward(lora_mlp, x, qs, ab, 2.0, activation)
    y_ref, grads_ref = forward_backward(lora_mlp_reference, x, dense, ab, 2.0, activation)
    # Same fp32 weights on both sides (the Triton dequantiser is exact), so fp32 tolerances.
    assert rel(y, y_ref) < 1e-5
    for name, gk, gr in zip(NAMES, grads, grads_ref):
        assert rel(gk, gr) < 1e-5, name
    # The reference also accepts NF4 weights and must agree with itself on the dense copies.
    y_ref_q, _ = forward_backward(lora_mlp_reference, x, qs, ab, 2.0, activation)
    assert torch.equal(y_ref_q, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_trained_base_weights_get_their_gradients(dtype, adapters):
    """Gate and down weights trained, up frozen, fp32 masters under x in ``dtype``; with no adapters
    (full fine-tuning) or with LoRA beside them; odd sizes (7 tokens, H 12, I 20)."""
    from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    x, ws, ab = make(7, 12, 20, 3, dtype, ab_dtype=torch.float32, seed=5)
    ab = ab if adapters else [None] * 6
    masters = [w.detach().float().requires_grad_(i != 1) for i, w in enumerate(ws)]
    x32, ws32 = leaf32(x), [leaf32(m) if m.requires_grad else m.detach() for m in masters]
    y = lora_mlp(*args(x, masters, ab), 2.0, "silu")
    y_ref = lora_mlp_reference(*args(x32, ws32, [leaf32(t) for t in ab]), 2.0, "silu")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    # fp32: summation order only; bf16: operands rounded as in the bf16 test above (0.3-0.6% measured)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert masters[1].grad is None  # the frozen up weight: no gradient work
    for i in (0, 2):
        assert masters[i].grad.dtype == torch.float32
        assert rel(masters[i].grad, ws32[i].grad) < tol, i
    assert rel(x.grad.float(), x32.grad) < tol


def test_partial_adapters_and_second_backward_are_refused():
    from tunedag.kernels.lora_mlp import lora_mlp

    x, ws, ab = make(5, 16, 24, 2, torch.float32)
    with pytest.raises(ValueError, match="or for none"):
        lora_mlp(*args(x, ws, [*ab[:4], None, None]), 1.0)
    y = lora_mlp(*args(x, ws, ab), 1.0)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        y.sum().backward()
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(*args(x, ws, ab), 1.0, "relu")


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
def test_without_output_the_gradients_are_the_same(adapters):
    """output=False (a checkpoint recompute): zeros for y, and from the same dy the same gradients of
    x, the adapters and a trained down weight as the full forward gives; odd sizes (9 tokens, H 20, I 36)."""
    from tunedag.kernels.lora_mlp import lora_mlp

    x, ws, ab = make(9, 20, 36, 3, torch.float32, seed=7)
    ab = ab if adapters else [None] * 6
    ws = [ws[0], ws[1], ws[2].clone().requires_grad_()]
    dy = torch.randn(9, 20, generator=torch.Generator().manual_seed(8)).to(DEV)
    results = []
    for output in (True, False):
        leaves = [t for t in (x, *ab, ws[2]) if t is not None]
        for t in leaves:
            t.grad = None
        y = lora_mlp(*args(x, ws, ab), 2.0, "silu", output=output)
        y.backward(dy)
        results.append((y.detach(), [t.grad.clone() for t in leaves]))
    (y_full, grads_full), (y_none, grads_none) = results
    assert y_full.abs().sum() > 0 and torch.equal(y_none, torch.zeros_like(y_full))
    for got, want in zip(grads_none, grads_full):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
