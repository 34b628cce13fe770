"""RMSNorm kernel (Llama and Gemma numerics, optional fused residual) against float64 references.

The bf16 reference runs in float64 with HF's rounding points emulated (the residual sum and, for
Llama, the normalised row are rounded to bf16 exactly where transformers rounds them, with the
gradient passing straight through as through HF's casts), so every kernel output is compared
with a value it should match to one final bf16 rounding.
"""
import pytest
import torch

from closeness import DEVICE, BF16_ROUNDING, FP32, INTERPRETING, Tol, assert_matches, poisoned_allocations, rand, tol_for

# Llama casts twice (the normalised row, then the product). On the GPU the first cast matches the
# reference's except where a 1-ulp float32 rstd difference flips it (one bf16 ulp, <= 2^-7, rare);
# the interpreter truncates it (<= 2^-7, always). Per element <= 3 casts' worth; norm <= 2.
LLAMA_BF16_Y = Tol(rel=2 * BF16_ROUNDING, rtol=3 * BF16_ROUNDING, atol_frac=1e-5)
# The same first-cast difference inside dw's sum over rows moves each term by <= 2^-7 of itself,
# in random directions: the sum moves ~2^-7 / sqrt(3) of rms(dw); 2^-5 * rms is 7 such sigmas.
LLAMA_BF16_DW = Tol(rel=2 * BF16_ROUNDING, rtol=BF16_ROUNDING + 1e-5, atol_frac=2**-5)


def _round_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Forward: ``t`` rounded to ``dtype`` (kept in t's dtype); backward: identity, like ``.to``."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def reference_fp64(x, w, eps, gemma, residual, io_dtype, h_value=None):
    """float64 RMSNorm with HF's rounding points emulated for ``io_dtype``.

    ``h_value``: use these values for ``residual + x`` (the kernel's own new residual, checked
    separately) so that the interpreter's truncating cast of ``h`` does not leak into ``y``.
    """
    h = x if residual is None else _round_like(residual + x, io_dtype)
    if h_value is not None:
        h = h + (h_value.to(h.dtype) - h).detach()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = n * (1.0 + w) if gemma else w * _round_like(n, io_dtype)
    return y, h


def check_rms_norm(shape, dtype, device, *, gemma, residual, eps=1e-6, x_scale=1.0, weight_dtype=None):
    """Forward and every gradient of ``rms_norm`` against ``reference_fp64`` on fresh random data."""
    from tunedag.kernels.rms_norm import rms_norm

    weight_dtype = weight_dtype or dtype
    hidden = shape[-1]
    x = rand(shape, dtype, device, x_scale, requires_grad=True)
    w_init = 0.3 * torch.randn(hidden, device=device) + (0.0 if gemma else 1.0)
    w = w_init.to(weight_dtype).requires_grad_()
    r = rand(shape, dtype, device, x_scale, requires_grad=True) if residual else None
    leaves = [x, w] + ([r] if residual else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    with poisoned_allocations():
        out = rms_norm(x, w, eps, gemma=gemma, residual=r)
        outs = out if residual else (out,)
        grads = [rand(o.shape, o.dtype, device) for o in outs]
        torch.autograd.backward(outs, grads)

    expected_dtype = dtype if gemma else torch.promote_types(dtype, weight_dtype)
    assert outs[0].dtype == expected_dtype
    x64, w64 = leaves64[:2]
    r64 = leaves64[2] if residual else None
    y_ref, h_ref = reference_fp64(x64, w64, eps, gemma, r64, dtype, outs[1].detach() if residual else None)
    refs = (y_ref, h_ref) if residual else (y_ref,)
    if residual:  # the new residual against the float32 sum, before the kernel's cast
        assert_matches(outs[1], x64.detach() + r64.detach(), tol_for(dtype), "new residual")
    torch.autograd.backward(refs, [g.double() for g in grads])

    tol = tol_for(dtype)
    llama_bf16 = dtype == torch.bfloat16 and not gemma
    assert_matches(outs[0], y_ref, LLAMA_BF16_Y if llama_bf16 else tol, "y")
    if residual:
        assert outs[1].dtype == dtype
        assert_matches(r.grad, leaves64[2].grad, tol, "d residual")
    assert_matches(x.grad, x64.grad, tol, "dx")
    assert w.grad.dtype == weight_dtype
    assert_matches(w.grad, w64.grad, LLAMA_BF16_DW if llama_bf16 else tol, "dweight")


SHAPES = [(1, 37), (3, 5, 129), (67, 256)]  # one row; odd hidden over 3-D; more rows than programs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm(shape, dtype, gemma):
    check_rms_norm(shape, dtype, DEVICE, gemma=gemma, residual=False)


@pytest.mark.parametrize("shape", [(1, 37), (3, 5, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm_fused_residual(shape, dtype, gemma):
    check_rms_norm(shape, dtype, DEVICE, gemma=gemma, residual=True)


def test_rms_norm_eps_dominates():
    # Mean square 1e-4 next to eps 1e-2: a misplaced or missing eps is a 100% error here.
    check_rms_norm((9, 70), torch.float32, DEVICE, gemma=False, residual=False, eps=1e-2, x_scale=1e-2)


def test_rms_norm_float32_weight_on_bf16_input():
    # peft's k-bit preparation leaves the weight in float32: HF's output is then float32.
    check_rms_norm((5, 96), torch.bfloat16, DEVICE, gemma=False, residual=False, weight_dtype=torch.float32)


def _bf16_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ia = a.contiguous().view(torch.int16).int()
    ib = b.contiguous().view(torch.int16).int()
    return (ia - ib).abs()


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_module_matches_hf(gemma):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunedag.kernels.rms_norm import TunedagGemmaRMSNorm, TunedagRMSNorm

    hidden, eps = 200, 1e-5
    hf = (GemmaRMSNorm if gemma else LlamaRMSNorm)(hidden, eps=eps)
    ours = (TunedagGemmaRMSNorm if gemma else TunedagRMSNorm)(hidden, eps=eps)
    hf, ours = hf.to(DEVICE), ours.to(DEVICE)
    assert torch.equal(ours.weight, hf.weight)  # same initialisation (ones / zeros)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden, device=DEVICE) * 0.3 + (0.0 if gemma else 1.0))
        ours.weight.copy_(hf.weight)

    # float32: the same function and gradients.
    x = rand((4, 6, hidden), torch.float32, DEVICE, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_()
    g = torch.randn(4, 6, hidden, device=DEVICE)
    ours(x).backward(g)
    hf(x_hf).backward(g)
    assert_matches(x.grad, x_hf.grad, FP32, "dx vs HF")
    assert_matches(ours.weight.grad, hf.weight.grad, FP32, "dweight vs HF")

    # bfloat16 module and input: the same casts as HF, so on the GPU outputs agree bit for bit
    # except where a 1-ulp float32 rstd difference flips the normalised value's bf16 rounding
    # (rare; after the multiply by a weight up to ~2 that is up to 2 ulps of the product);
    # the interpreter truncates both of Llama's casts (up to 3 ulps apart from HF after the product).
    hf, ours = hf.bfloat16(), ours.bfloat16()
    x = rand((4, 6, hidden), torch.bfloat16, DEVICE)
    with torch.no_grad():
        y, y_hf = ours(x), hf(x)
    assert y.dtype == y_hf.dtype == torch.bfloat16
    ulps = _bf16_ulps_apart(y, y_hf)
    assert ulps.max().item() <= (3 if INTERPRETING and not gemma else 2)
    if not INTERPRETING:
        assert (ulps == 0).float().mean().item() > 0.99


def test_module_fused_residual_matches_decoder_pattern():
    from tunedag.kernels.rms_norm import TunedagRMSNorm

    norm = TunedagRMSNorm(64).to(DEVICE)
    x, residual = rand((3, 64), torch.float32, DEVICE), rand((3, 64), torch.float32, DEVICE)
    y, new_residual = norm(x, residual)
    h = residual + x  # the decoder layer's "hidden_states = residual + hidden_states"
    assert_matches(new_residual, h, FP32, "new residual")
    assert_matches(y, norm(h), FP32, "normed")


def test_rejects_mismatched_weight():
    from tunedag.kernels.rms_norm import rms_norm

    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
