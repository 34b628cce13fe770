"""RMSNorm, optionally fused with the residual add, with a hand-written backward.

Numerics (the same casts as transformers' modules, so the kernel is a drop-in):

* Llama (``LlamaRMSNorm``):  ``y = w * (x.float() * rstd).to(x.dtype)``. The normalised row is
  rounded to the input dtype *before* the weight multiply, and the product takes the promoted
  dtype of weight and input (a float32 weight, as peft's k-bit preparation leaves it, gives a
  float32 output).
* Gemma (``GemmaRMSNorm``):  ``y = ((x.float() * rstd) * (1 + w.float())).to(x.dtype)``. Gemma
  stores ``w`` centred on zero (initialised to zeros), hence the ``1 +``; the multiply happens
  in float32 and only the result is rounded.

``rstd = 1 / sqrt(mean(x.float() ** 2) + eps)`` is accumulated in float32 for every dtype and
kept (one float per row) for the backward, which recomputes ``x * rstd`` instead of saving it.

With a residual, ``h = residual + x`` is formed in the input dtype (rounded once, like the
decoder layer's ``residual + hidden_states``), written out as the new residual, and normalised.

Backward, per row with ``n = x * rstd`` and ``g = dy * w_eff`` (``w_eff`` = ``w`` or ``1 + w``):
``dx = rstd * (g - n * mean(g * n))`` (+ the incoming gradient of the new residual), and
``dw = sum over rows of dy * n`` (Llama uses ``n`` rounded to the input dtype, as its forward
does). The weight gradient is summed per program into a float32 ``(programs, hidden)`` buffer and
reduced in a fixed order by a second small kernel: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl
from torch import nn

from ._device import multiprocessor_count

BACKWARD_PROGRAMS_PER_SM = 2  # backward programs per multiprocessor (each sums dw over its rows)


@triton.jit
def _rms_norm_forward_kernel(
    Y, y_row_stride,
    X, x_row_stride,
    R, r_row_stride,
    H, h_row_stride,
    W, RSTD,
    n_cols, eps,
    GEMMA: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * r_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * h_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    n = xf * rstd
    if GEMMA:
        y = n * (1.0 + w)
    else:
        y = n.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DX, dx_row_stride,
    DY, dy_row_stride,
    DH, dh_row_stride,
    X, x_row_stride,
    W, RSTD, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    GEMMA: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    n_mine = tl.minimum(row_start + rows_per_program, n_rows) - row_start
    for i in range(0, n_mine):
        row = row_start.to(tl.int64) + i
        x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = x.to(tl.float32) * rstd
        if GEMMA:
            dw += dy * n
        else:
            dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / n_cols))
        if HAS_DRESIDUAL:
            dx += tl.load(DH + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@triton.jit
def _sum_partials_kernel(OUT, PARTIAL, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[c] = sum over p of PARTIAL[p, c], in a fixed order, cast to OUT's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        m = (rows < n_partials)[:, None] & cmask[None, :]
        tile = tl.load(PARTIAL + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


def _row_settings(n_cols: int) -> tuple[int, int]:
    """Block covering one whole row, and warps for it (8 warps from 2048 columns: 16-byte accesses)."""
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rms_norm supports rows of at most 65536 elements, got {n_cols}")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View as (rows, hidden) with unit column stride; copies only when no such view exists."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward. Returns ``(y, rstd, h)``: ``h`` is the new residual (None without one)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )
        r2 = _as_rows(residual)
        h = torch.empty_like(x2)
    else:
        r2 = h = x2  # unused by the kernel
    block, num_warps = _row_settings(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](
        y, y.stride(0), x2, x2.stride(0), r2, r2.stride(0), h, h.stride(0),
        weight.contiguous(), rstd, n_cols, eps,
        GEMMA=gemma, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    y = y.view(x.shape)
    return y, rstd, (h.view(x.shape) if residual is not None else None)


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    gemma: bool,
    dh: torch.Tensor | None = None,
    programs_per_sm: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. ``x`` is what was normalised (the new residual when fused), ``dh`` the
    gradient arriving at the new residual. Returns ``(dx, dweight)``; with a residual, ``dx`` is
    the gradient of both ``x`` and ``residual`` (their sum feeds everything downstream)."""
    x2 = _as_rows(x)
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    dh2 = _as_rows(dh) if dh is not None else dy2
    # A few programs per multiprocessor, each walking a contiguous run of rows and summing its
    # share of dw in registers: the partial buffer is (programs, hidden) float32, small next to x.
    programs = min(n_rows, multiprocessor_count(x.device) * (programs_per_sm or BACKWARD_PROGRAMS_PER_SM))
    programs = max(programs, 1)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    block, num_warps = _row_settings(n_cols)
    _rms_norm_backward_kernel[(programs,)](
        dx, dx.stride(0), dy2, dy2.stride(0), dh2, dh2.stride(0), x2, x2.stride(0),
        weight.contiguous(), rstd, dw_partial, n_rows, n_cols, rows_per_program,
        GEMMA=gemma, HAS_DRESIDUAL=dh is not None, BLOCK=block, num_warps=num_warps,
    )
    dweight = torch.empty(n_cols, dtype=weight.dtype, device=weight.device)
    block_n = 64
    _sum_partials_kernel[(triton.cdiv(n_cols, block_n),)](
        dweight, dw_partial, programs, n_cols, BLOCK_P=32, BLOCK_N=block_n, num_warps=4
    )
    return dx.view(x.shape), dweight


class TunedagRMSNormFunction(torch.autograd.Function):
    """``y = rms_norm(x)`` or, with a residual, ``(y, h) = (rms_norm(residual + x), residual + x)``."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma, residual):
        y, rstd, h = rms_norm_forward(x, weight, eps, gemma, residual)
        ctx.gemma = gemma
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        if h is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(dy, x, weight, rstd, ctx.gemma, dh if ctx.has_residual else None)
        dresidual = dx if ctx.has_residual and ctx.needs_input_grad[4] else None
        return (
            dx if ctx.needs_input_grad[0] else None,
            dweight if ctx.needs_input_grad[1] else None,
            None,
            None,
            dresidual,
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    gemma: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of ``x`` (any leading shape).

    Args:
        x: activations, float32, float16 or bfloat16.
        weight: ``(hidden,)``; Llama semantics multiply by it, Gemma by ``1 + weight``.
        eps: added to the mean square.
        gemma: use ``GemmaRMSNorm``'s numerics instead of ``LlamaRMSNorm``'s.
        residual: if given, normalise ``residual + x`` and also return that sum.

    Returns:
        ``y`` of ``x``'s shape, or ``(y, residual + x)`` when ``residual`` is given.
    """
    return TunedagRMSNormFunction.apply(x, weight, eps, gemma, residual)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    gemma: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the same operations as ``LlamaRMSNorm`` / ``GemmaRMSNorm`` (autograd backward)."""
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        y = (normed * (1.0 + weight.float())).to(h.dtype)
    else:
        y = weight * normed.to(h.dtype)
    return y if residual is None else (y, h)


class TunedagRMSNorm(nn.Module):
    """Drop-in for ``LlamaRMSNorm(hidden_size, eps)``; ``forward(x, residual=None)`` also fuses
    the residual add (returning ``(normed, new_residual)``) when a residual is passed."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual=residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class TunedagGemmaRMSNorm(nn.Module):
    """Drop-in for ``GemmaRMSNorm(dim, eps)``: weight starts at zero and scales by ``1 + weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, gemma=True, residual=residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
