"""LoRA-fused attention projections with hand-written backward: Q, K, V from one x, and O.

Each projection is ``p(x) = x @ W.T + s * (x @ A.T) @ B.T`` (W dense, or a frozen
``NF4Weight`` dequantised by the Triton kernel in ``nf4.py`` on the fly, in forward and again
in backward; A, B trained). Q, K and V may have different output sizes (grouped-query
attention). Full fine-tuning passes no A/B (plain projections ``x @ W.T``).

Base weights: a dense W that requires grad gets ``grad W_p = dP^T x`` (one (out, N) x (N, H)
matmul in x's dtype, returned in W's dtype: an fp32 master weight is cast to x's dtype in
forward and again in backward, never kept twice); a frozen W costs no gradient work.

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

from .lora_mlp import check_adapters, lora_linear_reference, restore_weights, save_weights
from .nf4 import NF4Weight, maybe_dequantize


def _lora_forward(ctx, x, weights, lora_a, lora_b, s, need_w):
    """Outputs x W_p^T + s (x A_p^T) B_p^T for each projection p sharing the input x.

    The A's are stacked so that x meets them in one matmul, (N, H) x (H, sum r); the saved
    rank-r products are pre-scaled by s, ready for grad B_p = dP_p^T (s x A_p^T). With no
    adapters (``lora_a[0] is None``: full fine-tuning) the outputs are x W_p^T alone.
    ``need_w[p]``: W_p is trained, so backward returns grad W_p = dP_p^T x.
    """
    dt = x.dtype
    adapters = lora_a[0] is not None
    outs = [x @ maybe_dequantize(w, dt).t() for w in weights]  # (N, out_p) each
    saved = []
    if adapters:
        ranks = [a.shape[0] for a in lora_a]
        a_all = torch.cat(lora_a).to(dt)  # (sum r, H)
        bs = [b.to(dt) for b in lora_b]
        xa_all = x @ a_all.t()  # (N, sum r)
        for out, xa, b in zip(outs, xa_all.split(ranks, dim=1), bs):
            out.addmm_(xa, b.t(), alpha=s)
        xa_all.mul_(s)
        saved = [xa_all, a_all, *bs]
        ctx.ranks = ranks
        ctx.a_dtypes = [a.dtype for a in lora_a]
        ctx.b_dtypes = [b.dtype for b in lora_b]
    # the weights themselves are saved (an fp32 master is cast again in backward, not kept twice)
    dense = save_weights(ctx, weights)
    ctx.save_for_backward(x, *dense, *saved)
    ctx.scaling = s
    ctx.adapters = adapters
    ctx.need_w = need_w
    return outs


def _lora_backward(ctx, dps):
    """(dx, [grad W_p or None], [grad A_p], [grad B_p]) for output grads dps; shared by QKV and O."""
    x, *rest = ctx.saved_tensors
    k = len(dps)
    weights = restore_weights(ctx, rest[:k])
    s, dt = ctx.scaling, x.dtype
    dps = [d.contiguous().to(dt) for d in dps]
    grads_w = [(dp.t() @ x).to(w.dtype) if need else None  # (out_p, H)
               for dp, w, need in zip(dps, weights, ctx.need_w)]
    grads_a, grads_b, dpb_all = [None] * k, [None] * k, None
    if ctx.adapters:
        xas_all, a_all, *bs = rest[k:]
        dpb_all = torch.cat([dp @ b for dp, b in zip(dps, bs)], dim=1).mul_(s)  # (N, sum r)
        grad_a_all = dpb_all.t() @ x  # (sum r, H): every A's gradient in one matmul
        grads_b = [dp.t() @ xa for dp, xa in zip(dps, xas_all.split(ctx.ranks, dim=1))]
        if len(set(ctx.a_dtypes)) == 1:
            grad_a_all = grad_a_all.to(ctx.a_dtypes[0])
        grads_a = [g.to(d) for g, d in zip(grad_a_all.split(ctx.ranks, dim=0), ctx.a_dtypes)]
        grads_b = [g.to(d) for g, d in zip(grads_b, ctx.b_dtypes)]
    dx = None
    if ctx.needs_input_grad[0]:
        for dp, w in zip(dps, weights):
            w = maybe_dequantize(w, dt)
            if dx is None:
                dx = dp @ w  # (N, H)
            else:
                dx.addmm_(dp, w)
        del w
        if dpb_all is not None:
            dx.addmm_(dpb_all, a_all)
    return dx, grads_w, grads_a, grads_b


class TunedagLoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a, v_b, scaling):
        need_w = [ctx.needs_input_grad[i] for i in (1, 4, 7)]
        return tuple(_lora_forward(ctx, x, (q_w, k_w, v_w), (q_a, k_a, v_a), (q_b, k_b, v_b),
                                   float(scaling), need_w))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dx, gw, ga, gb = _lora_backward(ctx, (dq, dk, dv))
        return dx, gw[0], ga[0], gb[0], gw[1], ga[1], gb[1], gw[2], ga[2], gb[2], None


class TunedagLoRAOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o_w, o_a, o_b, scaling):
        return _lora_forward(ctx, x, (o_w,), (o_a,), (o_b,), float(scaling), [ctx.needs_input_grad[1]])[0]

    @staticmethod
    def backward(ctx, do):
        dx, gw, ga, gb = _lora_backward(ctx, (do,))
        return dx, gw[0], ga[0], gb[0], None


def _flat(x):
    return x.reshape(-1, x.shape[-1]).contiguous()


def lora_qkv(
    x: torch.Tensor,
    q_w: torch.Tensor | NF4Weight, q_a: torch.Tensor | None, q_b: torch.Tensor | None,
    k_w: torch.Tensor | NF4Weight, k_a: torch.Tensor | None, k_b: torch.Tensor | None,
    v_w: torch.Tensor | NF4Weight, v_a: torch.Tensor | None, v_b: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, K, V) = LoRA projections of x (..., H), or plain ones with every A/B None; grads for
    x, the A/B, and each dense W that requires grad."""
    check_adapters(q_a, q_b, k_a, k_b, v_a, v_b)
    lead = x.shape[:-1]
    q, k, v = TunedagLoRAQKVFunction.apply(_flat(x), q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a,
                                           v_b, scaling)
    return tuple(t.reshape(*lead, t.shape[-1]) for t in (q, k, v))


def lora_o(x: torch.Tensor, o_w: torch.Tensor | NF4Weight, o_a: torch.Tensor | None,
           o_b: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Output projection with LoRA (or plain, A and B None): x (..., in) -> (..., out)."""
    check_adapters(o_a, o_b)
    out = TunedagLoRAOFunction.apply(_flat(x), o_w, o_a, o_b, scaling)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def lora_qkv_reference(x, q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a, v_b, scaling):
    """Plain eager PyTorch, peft-style: three independent LoRA Linears."""
    return (lora_linear_reference(x, q_w, q_a, q_b, scaling),
            lora_linear_reference(x, k_w, k_a, k_b, scaling),
            lora_linear_reference(x, v_w, v_a, v_b, scaling))


def lora_o_reference(x, o_w, o_a, o_b, scaling):
    return lora_linear_reference(x, o_w, o_a, o_b, scaling)
