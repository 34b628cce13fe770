"""Grouped GEMM for mixture-of-experts: rows sorted by expert meet their expert's matrix in one call.

``x`` (M, K) holds the routed rows grouped by expert (expert 0's rows first), ``offs`` (E,) int32
the cumulative row counts (group e is rows ``offs[e-1]:offs[e]``), ``w`` (E, K, N) one matrix per
expert (any strides: expert weights stored (E, N, K) pass as ``w.transpose(1, 2)``). The result is
(M, N) with row m = x[m] @ w[expert of m]. Backward gives dx = dy w_e^T per group and, where ``w``
is trained (the LoRA factors of every expert), dw_e = x_e^T dy_e.

Backends, never a Python loop over experts:

- CUDA, bf16, 16-byte aligned sizes: ``torch._grouped_mm`` (one CUTLASS grouped GEMM on Hopper),
  for the forward, dx (3-D weight) and dw (ragged-K form, 2-D x 2-D -> 3-D);
- elsewhere (the CPU, fp32): a padded ``bmm``: rows scattered into (E, C, K) slots, C the largest
  group, one batched matmul, rows gathered back. The padding costs (E C - M) wasted rows.
"""
from __future__ import annotations

import torch


def group_offsets(expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int32 cumulative row counts of rows already sorted by expert index."""
    counts = torch.bincount(expert_of_row, minlength=num_experts)
    return counts.cumsum(0).to(torch.int32)


def _native(x: torch.Tensor, w: torch.Tensor) -> bool:
    aligned = all(d % 8 == 0 for d in (x.shape[1], w.shape[-1]))
    return x.is_cuda and x.dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")


def _slots(offs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert of each row, its slot within the expert's group, largest group) for the padded path."""
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    expert = torch.repeat_interleave(torch.arange(offs.numel(), device=offs.device), counts, output_size=m)
    starts = offs.long() - counts
    return expert, torch.arange(m, device=offs.device) - starts[expert], int(counts.max()) if m else 0


def _pad(x: torch.Tensor, expert, slot, e: int, cap: int) -> torch.Tensor:
    out = x.new_zeros(e, cap, x.shape[1])
    out[expert, slot] = x
    return out


def _mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K), w (E, K, N) -> (M, N)."""
    if _native(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    expert, slot, cap = _slots(offs, x.shape[0])
    y = torch.bmm(_pad(x, expert, slot, w.shape[0], cap), w.to(x.dtype))  # (E, C, N)
    return y[expert, slot]


def _wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, e: int) -> torch.Tensor:
    """x (M, K), dy (M, N) -> (E, K, N): per group x_e^T dy_e."""
    if _native(x, dy):
        return torch._grouped_mm(x.t(), dy, offs=offs)
    expert, slot, cap = _slots(offs, x.shape[0])
    return torch.bmm(_pad(x, expert, slot, e, cap).transpose(1, 2), _pad(dy, expert, slot, e, cap))


class TunedagGroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = _wgrad(x, dy, offs, w.shape[0]).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, K) sorted by expert times their expert's w (E, K, N) -> (M, N); see the module doc."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or offs.numel() != w.shape[0]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)}, w {tuple(w.shape)} and offs {tuple(offs.shape)} "
                         "must be (M, K), (E, K, N) and (E,)")
    return TunedagGroupedMMFunction.apply(x.contiguous(), w, offs)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """One matmul per expert (tests only)."""
    starts = [0] + offs.tolist()[:-1]
    return torch.cat([x[s:e] @ w[i].to(x.dtype) for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
