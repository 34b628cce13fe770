"""LoRA-fused attention projections with hand-written backward: Q, K, V from one x, and O.

Each projection is ``p(x) = x @ W.T + s * (x @ A.T) @ B.T`` (W frozen: dense, or an
``NF4Weight`` dequantised by the Triton kernel in ``nf4.py`` on the fly, in forward and again
in backward; A, B trained). Q, K and V may have different output sizes (grouped-query
attention).

Saved for backward: x once for all three projections (eager peft keeps a reference per
projection plus its adapter-dtype copy of x for each), and the three rank-r products
x A^T (N, r). Backward, with dQ, dK, dV:

  grad A_p = s (dP B_p)^T x,   grad B_p = s dP^T (x A_p^T)        for p in q, k, v
  dx = dQ W_q + dK W_k + dV W_v + s [dQ B_q | dK B_k | dV B_v] @ [A_q; A_k; A_v]

the last term as one (N, 3r) x (3r, H) matmul. O is the same with one projection
(``lora_o``). All matmuls are cuBLAS in x's dtype; A/B are cast to it once per call and their
gradients returned in their own dtype. The only Triton kernel here is NF4 dequantisation:
there is no elementwise work between these matmuls to fuse.
"""
from __future__ import annotations

import torch

from .lora_mlp import check_frozen_base, lora_linear_reference, restore_weights, save_weights
from .nf4 import NF4Weight, maybe_dequantize


def _project(x, w, a, b, s, dt):
    xa = x @ a.t()  # (N, r)
    out = x @ maybe_dequantize(w, dt).t()  # (N, out)
    out.addmm_(xa, b.t(), alpha=s)
    return out, xa


def _lora_backward(ctx, x, dps, xas, ab, weights, s):
    """Grads of x and each projection's (A, B) for outputs grads dps; shared by QKV and O."""
    dt = x.dtype
    dps = [d.contiguous().to(dt) for d in dps]
    grads_ab = []
    dpbs = []
    for dp, xa, (a, b) in zip(dps, xas, ab):
        dpb = dp @ b  # (N, r)
        dpbs.append(dpb)
        grads_ab.append(((dpb.t() @ x).mul_(s), (dp.t() @ xa).mul_(s)))  # (r, H), (out, r)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = None
        for dp, w in zip(dps, weights):
            w = maybe_dequantize(w, dt)
            if dx is None:
                dx = dp @ w  # (N, H)
            else:
                dx.addmm_(dp, w)
        del w
        dx.addmm_(torch.cat(dpbs, dim=1), torch.cat([a for a, _ in ab], dim=0), alpha=s)
    return dx, grads_ab


class TunedagLoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q_w, q_a, q_b, k_w, k_a, k_b, v_w, v_a, v_b, scaling):
        dt = x.dtype
        s = float(scaling)
        ab = [(a.to(dt), b.to(dt)) for a, b in ((q_a, q_b), (k_a, k_b), (v_a, v_b))]
        outs, xas = [], []
        for w, (a, b) in zip((q_w, k_w, v_w), ab):
            o, xa = _project(x, w, a, b, s, dt)
            outs.append(o)
            xas.append(xa)
        dense = save_weights(ctx, (q_w, k_w, v_w))
        ctx.save_for_backward(x, *xas, *[t for pair in ab for t in pair], *dense)
        ctx.scaling = s
        ctx.ab_dtypes = [t.dtype for t in (q_a, q_b, k_a, k_b, v_a, v_b)]
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, xq, xk, xv, qa, qb, ka, kb, va, vb, *dense = ctx.saved_tensors
        weights = restore_weights(ctx, dense)
        dx, g = _lora_backward(ctx, x, (dq, dk, dv), (xq, xk, xv),
                               ((qa, qb), (ka, kb), (va, vb)), weights, ctx.scaling)
        flat = [t.to(d) for t, d in zip([t for pair in g for t in pair], ctx.ab_dtypes)]
        return (dx, None, flat[0], flat[1], None, flat[2], flat[3], None, flat[4], flat[5],
                None)


class TunedagLoRAOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o_w, o_a, o_b, scaling):
        dt = x.dtype
        s = float(scaling)
        a, b = o_a.to(dt), o_b.to(dt)
        out, xa = _project(x, o_w, a, b, s, dt)
        dense = save_weights(ctx, (o_w,))
        ctx.save_for_backward(x, xa, a, b, *dense)
        ctx.scaling = s
        ctx.ab_dtypes = (o_a.dtype, o_b.dtype)
        return out

    @staticmethod
    def backward(ctx, do):
        x, xa, a, b, *dense = ctx.saved_tensors
        weights = restore_weights(ctx, dense)
        dx, g = _lora_backward(ctx, x, (do,), (xa,), ((a, b),), weights, ctx.scaling)
        return dx, None, g[0][0].to(ctx.ab_dtypes[0]), g[0][1].to(ctx.ab_dtypes[1]), None


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
