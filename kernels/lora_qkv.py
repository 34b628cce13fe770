"""LoRA-fused attention projections with hand-written backward: Q, K, V from one x, and O.

Each projection is ``p(x) = x @ W.T + s * (x @ A.T) @ B.T`` (W frozen: dense, or an
``NF4Weight`` dequantised by the Triton kernel in ``nf4.py`` on the fly, in forward and again
in backward; A, B trained). Q, K and V may have different output sizes (grouped-query
attention).

Saved for backward: x once for all three projections (eager peft keeps a reference per
projection plus its adapter-dtype copy of x for each), and the rank-r products s x A^T,
(N, 3r) together. The three A's are stacked, so x meets them in one matmul forward and
backward. Backward, with dQ, dK, dV and D = s [dQ B_q | dK B_k | dV B_v] (N, 3r):

  [grad A_q; grad A_k; grad A_v] = D^T x                         one (3r, N) x (N, H) matmul
  grad B_p = dP^T (s x A_p^T)                                    for p in q, k, v
  dx = dQ W_q + dK W_k + dV W_v + D [A_q; A_k; A_v]

Fewer, larger launches matter here: at 4096 tokens these projections take ~1.5 ms of GPU
time, and a Python-side launch costs tens of microseconds on a slow host. O is the same with
one projection (``lora_o``). All matmuls are cuBLAS in x's dtype; A/B are cast to it once per
call and their gradients returned in their own dtype. The only Triton kernel here is NF4
dequantisation: there is no elementwise work between these matmuls to fuse.
"""
from __future__ import annotations

import torch

from .lora_mlp import check_frozen_base, lora_linear_reference, restore_weights, save_weights
from .nf4 import NF4Weight, maybe_dequantize


def _lora_forward(ctx, x, weights, lora_a, lora_b, s):
    """Outputs x W_p^T + s (x A_p^T) B_p^T for each projection p sharing the input x.

    The A's are stacked so that x meets them in one matmul, (N, H) x (H, sum r); the saved
    rank-r products are pre-scaled by s, ready for grad B_p = dP_p^T (s x A_p^T).
    """
    dt = x.dtype
    ranks = [a.shape[0] for a in lora_a]
    a_all = torch.cat(lora_a).to(dt)  # (sum r, H)
    bs = [b.to(dt) for b in lora_b]
    xa_all = x @ a_all.t()  # (N, sum r)
    outs = []
    for w, xa, b in zip(weights, xa_all.split(ranks, dim=1), bs):
        out = x @ maybe_dequantize(w, dt).t()  # (N, out_p)
        out.addmm_(xa, b.t(), alpha=s)
        outs.append(out)
    xa_all.mul_(s)
    dense = save_weights(ctx, weights)
    ctx.save_for_backward(x, xa_all, a_all, *bs, *dense)
    ctx.scaling = s
    ctx.ranks = ranks
    ctx.a_dtypes = [a.dtype for a in lora_a]
    ctx.b_dtypes = [b.dtype for b in lora_b]
    return outs


def _lora_backward(ctx, dps):
    """(dx, [grad A_p], [grad B_p]) for output grads dps; shared by QKV and O."""
    x, xas_all, a_all, *rest = ctx.saved_tensors
    k = len(dps)
    bs, weights = rest[:k], restore_weights(ctx, rest[k:])
    s, dt = ctx.scaling, x.dtype
    dps = [d.contiguous().to(dt) for d in dps]
    dpb_all = torch.cat([dp @ b for dp, b in zip(dps, bs)], dim=1).mul_(s)  # (N, sum r)
    grad_a_all = dpb_all.t() @ x  # (sum r, H): every A's gradient in one matmul
    grads_b = [dp.t() @ xa for dp, xa in zip(dps, xas_all.split(ctx.ranks, dim=1))]
    dx = None
    if ctx.needs_input_grad[0]:
        for dp, w in zip(dps, weights):
            w = maybe_dequantize(w, dt)
            if dx is None:
                dx = dp @ w  # (N, H)
            else:
                dx.addmm_(dp, w)
        del w
        dx.addmm_(dpb_all, a_all)
    if len(set(ctx.a_dtypes)) == 1:
        grad_a_all = grad_a_all.to(ctx.a_dtypes[0])
    grads_a = [g.to(d) for g, d in zip(grad_a_all.split(ctx.ranks, dim=0), ctx.a_dtypes)]
    grads_b = [g.to(d) for g, d in zip(grads_b, ctx.b_dtypes)]
    return dx, grads_a, grads_b


class TunedagLoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a, v_b, scaling):
        return tuple(_lora_forward(ctx, x, (q_w, k_w, v_w), (q_a, k_a, v_a), (q_b, k_b, v_b),
                                   float(scaling)))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dx, ga, gb = _lora_backward(ctx, (dq, dk, dv))
        return dx, None, ga[0], gb[0], None, ga[1], gb[1], None, ga[2], gb[2], None


class TunedagLoRAOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o_w, o_a, o_b, scaling):
        return _lora_forward(ctx, x, (o_w,), (o_a,), (o_b,), float(scaling))[0]

    @staticmethod
    def backward(ctx, do):
        dx, ga, gb = _lora_backward(ctx, (do,))
        return dx, None, ga[0], gb[0], None


def _flat(x):
    return x.reshape(-1, x.shape[-1]).contiguous()


def lora_qkv(
    x: torch.Tensor,
    q_w: torch.Tensor | NF4Weight, q_a: torch.Tensor, q_b: torch.Tensor,
    k_w: torch.Tensor | NF4Weight, k_a: torch.Tensor, k_b: torch.Tensor,
    v_w: torch.Tensor | NF4Weight, v_a: torch.Tensor, v_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, K, V) = LoRA projections of x (..., H); grads for x and the six A/B only."""
    check_frozen_base(q_w, k_w, v_w)
    lead = x.shape[:-1]
    q, k, v = TunedagLoRAQKVFunction.apply(_flat(x), q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a,
                                           v_b, scaling)
    return tuple(t.reshape(*lead, t.shape[-1]) for t in (q, k, v))


def lora_o(x: torch.Tensor, o_w: torch.Tensor | NF4Weight, o_a: torch.Tensor,
           o_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Output projection with LoRA: x (..., in) -> (..., out)."""
    check_frozen_base(o_w)
    out = TunedagLoRAOFunction.apply(_flat(x), o_w, o_a, o_b, scaling)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def lora_qkv_reference(x, q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a, v_b, scaling):
    """Plain eager PyTorch, peft-style: three independent LoRA Linears."""
    return (lora_linear_reference(x, q_w, q_a, q_b, scaling),
            lora_linear_reference(x, k_w, k_a, k_b, scaling),
            lora_linear_reference(x, v_w, v_a, v_b, scaling))


def lora_o_reference(x, o_w, o_a, o_b, scaling):
    return lora_linear_reference(x, o_w, o_a, o_b, scaling)
