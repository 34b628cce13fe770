"""Comparison helpers for the kernel tests (CPU and CUDA).

Every check is two-sided and NaN never passes: the relative error of the whole tensor,
``||out - ref|| / ||ref||``, must be under ``rel``, and every element must satisfy
``|out - ref| <= rtol * |ref| + atol_frac * rms(ref)`` (``torch.testing.assert_close``), which
catches a wrong column or row that a norm over millions of elements would average away.
"""
import contextlib
from dataclasses import dataclass

import os

import torch

# Largest relative error of one float32 -> bfloat16 cast inside a kernel: round-to-nearest on
# the GPU (2^-8), but the Triton interpreter truncates (round toward zero: up to one ulp, 2^-7).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels interpreted
BF16_ROUNDING = 2.0**-7 if INTERPRETING else 2.0**-8


@dataclass(frozen=True)
class Tol:
    rel: float  # bound on ||out - ref|| / ||ref||
    rtol: float  # per element, relative to |ref|
    atol_frac: float  # per element, absolute, as a fraction of rms(ref) (cancellation near zero)


# References run in float64. float32 kernels carry ~1e-7 relative error per operation (and the
# GPU's approximate exp/rsqrt ~2e-7); 1e-5 leaves room for a few dozen such steps and is still
# far below any indexing or formula bug.
FP32 = Tol(rel=1e-5, rtol=1e-5, atol_frac=1e-5)
# bfloat16 outputs are float32 results cast once: each element within BF16_ROUNDING of the
# exact value, so the norm is too; the 1e-5 terms absorb the float32 noise before the cast.
BF16 = Tol(rel=BF16_ROUNDING + 1e-5, rtol=BF16_ROUNDING + 1e-5, atol_frac=1e-5)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: Tol, what: str) -> None:
    """Two-sided closeness of ``out`` to the (float64) reference ``ref``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert torch.isfinite(ref64).all(), f"{what}: the reference itself is not finite"
    bad = (~torch.isfinite(out64)).sum().item()
    assert bad == 0, f"{what}: {bad} non-finite elements (unwritten or overflowed)"
    ref_norm = ref64.norm().item()
    assert ref_norm > 0, f"{what}: the reference is all zeros, which proves nothing"
    err = (out64 - ref64).norm().item() / ref_norm
    assert err <= tol.rel, f"{what}: relative error {err:.3e} > {tol.rel:.3e}"
    rms = ref_norm / max(ref64.numel(), 1) ** 0.5
    torch.testing.assert_close(out64, ref64, rtol=tol.rtol, atol=tol.atol_frac * rms, msg=lambda m: f"{what}: {m}")


def tol_for(dtype: torch.dtype) -> Tol:
    return {torch.float32: FP32, torch.bfloat16: BF16}[dtype]


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block, ``torch.empty``/``empty_like``/``empty_strided`` return NaN-filled tensors,
    so any output element a kernel fails to write stays NaN and fails ``assert_matches``."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned(alloc):
        return lambda *a, **k: poison(alloc(*a, **k))

    for name, alloc in originals.items():
        setattr(torch, name, poisoned(alloc))
    try:
        yield
    finally:
        for name, alloc in originals.items():
            setattr(torch, name, alloc)


def rand(shape, dtype, device, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Fresh normal random data (never zeros: they hide unwritten outputs and wrong indexing)."""
    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def check_gated_activation(fn, reference, shape, dtype, device, layout, scale=2.0):
    """``c = fn(a, b)`` and its gradients against ``reference`` on float64 copies.

    ``layout='separate'``: ``a``/``b`` are distinct tensors (HF's gate_proj / up_proj outputs);
    the gradients are asked for directly and must be written over ``a`` and ``b``.
    ``layout='chunked'``: the two halves of one fused ``(..., 2 I)`` projection (strided rows);
    the gradient goes back through the split to the fused tensor.
    """
    inner = shape[-1]
    if layout == "separate":
        a_leaf = rand(shape, dtype, device, scale, requires_grad=True)
        b_leaf = rand(shape, dtype, device, scale, requires_grad=True)
        leaves = [a_leaf, b_leaf]
    else:
        fused = rand(shape[:-1] + (2 * inner,), dtype, device, scale, requires_grad=True)
        leaves = [fused]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    def split(ts):
        return (ts[0], ts[1]) if layout == "separate" else ts[0].chunk(2, dim=-1)

    with poisoned_allocations():
        if layout == "separate":
            a, b = (t.clone() for t in leaves)  # non-leaf activations, as a projection makes them
        else:
            a, b = leaves[0].clone().chunk(2, dim=-1)
        a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
        c = fn(a, b)
        g = rand(c.shape, dtype, device)
        if layout == "separate":
            grads = torch.autograd.grad(c, [a, b], g)
            assert grads[0].data_ptr() == a_ptr and grads[1].data_ptr() == b_ptr, "backward not in place"
        else:
            grads = torch.autograd.grad(c, leaves, g)
    c_ref = reference(*split(leaves64))
    grads_ref = torch.autograd.grad(c_ref, leaves64, g.double())
    tol = tol_for(dtype)
    assert c.dtype == dtype
    assert_matches(c, c_ref, tol, "c")
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_matches(got, want, tol, f"grad {i}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64; non-finite values on either side fail."""
    assert torch.isfinite(a).all(), "non-finite values in the kernel's output"
    assert torch.isfinite(b).all(), "non-finite values in the reference"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def leaf32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 leaf copy of a (possibly bf16) input, for the float32 reference."""
    return None if t is None else t.detach().float().requires_grad_()


def check_mlp_matches_hf(ours: torch.nn.Module, hf: torch.nn.Module, hidden: int) -> None:
    """``ours`` (with ``hf``'s weights) gives HF's MLP output and the gradients of input and weights."""
    hf, ours = hf.to(DEVICE), ours.to(DEVICE)
    ours.load_state_dict(hf.state_dict())
    x = rand((2, 5, hidden), torch.float32, DEVICE, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, hidden, device=DEVICE)
    y, y_hf = ours(x), hf(x_hf)
    assert_matches(y, y_hf, FP32, "MLP output")
    y.backward(g)
    y_hf.backward(g)
    assert_matches(x.grad, x_hf.grad, FP32, "dx")
    for (name, p), p_hf in zip(ours.named_parameters(), hf.parameters()):
        assert_matches(p.grad, p_hf.grad, FP32, f"d {name}")
