"""LoRA-fused gated MLP: ``y = down(act(gate(x)) * up(x))`` with a hand-written backward.

Each projection is ``p(x) = x @ W.T + s * (x @ A.T) @ B.T`` with W (out, in) (a dense
bf16/fp16/fp32 tensor or a frozen ``NF4Weight`` dequantised on the fly by the Triton kernel in
``nf4.py``), A (r, in) and B (out, r) trained, s = lora_alpha / r. ``act`` is SiLU (SwiGLU:
Llama, Mistral, Qwen) or GELU-tanh (GeGLU: Gemma). No bias, no dropout on this path. Full
fine-tuning passes no A/B at all: ``p(x) = x @ W.T``.

What is saved for backward (N tokens, H hidden, I intermediate, r rank):
x (N, H), the gate and up pre-activations g, u (N, I), and the rank-r products x A_g^T,
x A_u^T, h A_d^T (N, r each). Not saved: h = act(g) * u (recomputed in backward by the same
Triton pass that computes dg and du), and no dense copy of an NF4 weight (dequantised again in
backward). Eager PyTorch + peft keeps x, g, act(g), u, h and the LoRA intermediates in both the
adapter's and the model's dtype.

Backward, with dY (N, H):
  dh = dY @ W_d + s (dY @ B_d) @ A_d                        (N, I)
  h, dg, du = act(g) u,  dh * u * act'(g),  dh * act(g)     one Triton pass, in place over
                                                            dh, g, u (backward runs once)
  grad A_d = s (dY B_d)^T h,  grad B_d = s dY^T (h A_d^T)
  grad A_g = s (dg B_g)^T x,  grad B_g = s dg^T (x A_g^T)   (same for up)
  dx = dg W_g + du W_u + s (dg B_g) A_g + s (du B_u) A_u
  grad W_d = dY^T h,  grad W_g = dg^T x,  grad W_u = du^T x    only for a W that requires grad

A W that requires grad (full fine-tuning, or ``unfrozen_parameters``) gets its gradient in its own
dtype: an fp32 master weight is cast to x's dtype per call (forward, and again in backward; the
cast copy is not saved) and its gradient is the bf16 matmul's result cast to fp32, as under
autocast. Frozen weights cost no gradient work.

The matmuls are cuBLAS (``torch.mm``/``addmm_``) in x's dtype; the LoRA A/B are cast to x's
dtype once per call (they are tiny) and their gradients returned in their own dtype. The
activation and its derivative are computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._tl_math import tanh
from ._tl_rounding import cast_for_store
from .nf4 import NF4Weight, dequantize_nf4_reference, maybe_dequantize

ACTIVATIONS = ("silu", "gelu_tanh")
_ELEMWISE_BLOCK = 1024


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32. ACT 0: SiLU; 1: GELU with the tanh approximation."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    else:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        k1 = 0.044715
        t = tanh(k0 * (g + k1 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * g * g)
    return a, da


@triton.jit
def _act_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(h_ptr + offs, cast_for_store(a * u, h_ptr), mask=mask)


@triton.jit
def _act_mul_bwd_kernel(g_ptr, u_ptr, dh_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # In place: dh_ptr <- h = act(g) u, g_ptr <- dg, u_ptr <- du.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(dh_ptr + offs, cast_for_store(a * u, dh_ptr), mask=mask)
    tl.store(g_ptr + offs, cast_for_store(dh * u * da, g_ptr), mask=mask)
    tl.store(u_ptr + offs, cast_for_store(dh * a, u_ptr), mask=mask)


def _act_id(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)


def act_mul(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(g) * u for contiguous g, u of one shape."""
    h = torch.empty_like(g)
    n = g.numel()
    _act_mul_fwd_kernel[(triton.cdiv(n, _ELEMWISE_BLOCK),)](
        g, u, h, n, ACT=_act_id(activation), BLOCK=_ELEMWISE_BLOCK, num_warps=4)
    return h


def act_mul_backward_(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, activation: str):
    """Overwrite dh with h, g with dg, u with du; returns (h, dg, du)."""
    n = g.numel()
    _act_mul_bwd_kernel[(triton.cdiv(n, _ELEMWISE_BLOCK),)](
        g, u, dh, n, ACT=_act_id(activation), BLOCK=_ELEMWISE_BLOCK, num_warps=4)
    return dh, g, u


def check_adapters(*ab) -> None:
    """LoRA A/B for every projection of one call, or for none (plain projections: full fine-tuning)."""
    given = [t is not None for t in ab]
    if any(given) and not all(given):
        raise ValueError("LoRA A and B must be given for every projection of the call, or for none "
                         "(plain projections, as in full fine-tuning)")


def save_weights(ctx, weights) -> list:
    """Dense base weights go through save_for_backward, NF4 weights stay on ctx."""
    ctx.nf4 = [w if isinstance(w, NF4Weight) else None for w in weights]
    return [w if not isinstance(w, NF4Weight) else None for w in weights]


def restore_weights(ctx, dense) -> list:
    return [q if q is not None else d for q, d in zip(ctx.nf4, dense)]


def _project(x, w, a, b, s):
    """(x W^T + s (x A^T) B^T, x A^T) in x's dtype; (x W^T, None) without an adapter."""
    y = x @ maybe_dequantize(w, x.dtype).t()
    if a is None:
        return y, None
    xa = x @ a.t()  # (N, r)
    y.addmm_(xa, b.t(), alpha=s)
    return y, xa


class TunedagLoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b,
                scaling, activation, output=True):
        dt = x.dtype
        s = float(scaling)
        adapters = gate_a is not None
        ab = (gate_a, gate_b, up_a, up_b, down_a, down_b)
        ag, bg, au, bu, ad, bd = (t.to(dt) for t in ab) if adapters else ab

        g, xag = _project(x, gate_w, ag, bg, s)  # (N, I), (N, r)
        u, xau = _project(x, up_w, au, bu, s)
        if output:
            h = act_mul(g, u, activation)  # (N, I)
            y, hd = _project(h, down_w, ad, bd, s)  # (N, H), (N, r)
            del h
        else:  # backward needs down's input only through h A_d^T, and not its output
            hd = act_mul(g, u, activation) @ ad.t() if adapters else None
            y = x.new_zeros(x.shape)

        dense = save_weights(ctx, (gate_w, up_w, down_w))
        lora = (xag, xau, hd, ag, bg, au, bu, ad, bd) if adapters else ()
        ctx.save_for_backward(x, g, u, *dense, *lora)
        ctx.scaling = s
        ctx.activation = activation
        ctx.adapters = adapters
        ctx.need_w = [ctx.needs_input_grad[i] for i in (1, 4, 7)]
        ctx.ab_dtypes = [t.dtype for t in ab] if adapters else None
        ctx.done = False
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.done:
            raise RuntimeError("TunedagLoRAMLPFunction's backward overwrites its saved "
                               "activations and can run only once (no retain_graph)")
        ctx.done = True
        x, g, u, *rest = ctx.saved_tensors
        gate_w, up_w, down_w = restore_weights(ctx, rest[:3])
        need_gw, need_uw, need_dw = ctx.need_w
        s = ctx.scaling
        dt = x.dtype
        dy = dy.contiguous().to(dt)
        if ctx.adapters:
            xag, xau, hd, ag, bg, au, bu, ad, bd = rest[3:]

        w = maybe_dequantize(down_w, dt)
        dh = dy @ w  # (N, I)
        del w
        if ctx.adapters:
            dyb = dy @ bd  # (N, r)
            dh.addmm_(dyb, ad, alpha=s)
        h, dg, du = act_mul_backward_(g, u, dh, ctx.activation)

        grad_dw = (dy.t() @ h).to(down_w.dtype) if need_dw else None  # (H, I)
        grad_gw = (dg.t() @ x).to(gate_w.dtype) if need_gw else None  # (I, H)
        grad_uw = (du.t() @ x).to(up_w.dtype) if need_uw else None
        grads = [None] * 6
        if ctx.adapters:
            grad_ad = (dyb.t() @ h).mul_(s)  # (r, I)
            grad_bd = (dy.t() @ hd).mul_(s)  # (H, r)
            dgb = dg @ bg  # (N, r)
            dub = du @ bu
            grad_ag = (dgb.t() @ x).mul_(s)
            grad_bg = (dg.t() @ xag).mul_(s)
            grad_au = (dub.t() @ x).mul_(s)
            grad_bu = (du.t() @ xau).mul_(s)
            grads = [t.to(d) for t, d in zip(
                (grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd), ctx.ab_dtypes)]
        del h

        dx = None
        if ctx.needs_input_grad[0]:
            w = maybe_dequantize(gate_w, dt)
            dx = dg @ w  # (N, H)
            w = maybe_dequantize(up_w, dt)
            dx.addmm_(du, w)
            del w
            if ctx.adapters:
                dx.addmm_(dgb, ag, alpha=s)
                dx.addmm_(dub, au, alpha=s)

        return (dx, grad_gw, grads[0], grads[1], grad_uw, grads[2], grads[3], grad_dw, grads[4],
                grads[5], None, None, None)


def lora_mlp(
    x: torch.Tensor,
    gate_w: torch.Tensor | NF4Weight, gate_a: torch.Tensor | None, gate_b: torch.Tensor | None,
    up_w: torch.Tensor | NF4Weight, up_a: torch.Tensor | None, up_b: torch.Tensor | None,
    down_w: torch.Tensor | NF4Weight, down_a: torch.Tensor | None, down_b: torch.Tensor | None,
    scaling: float, activation: str = "silu", output: bool = True,
) -> torch.Tensor:
    """Gated MLP with LoRA on gate/up/down (or none: every A/B None). x (..., H) -> (..., H);
    grads for x, the A/B, and each dense W that requires grad.

    ``output=False``: zeros in place of y, and the same gradients from the same upstream ``dy``. For a
    checkpointed layer's recompute, whose output is thrown away: the down projection (a third of the
    MLP's matmuls, and its NF4 dequantisation) is not run, as its backward needs only its input.
    """
    _act_id(activation)
    check_adapters(gate_a, gate_b, up_a, up_b, down_a, down_b)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    y = TunedagLoRAMLPFunction.apply(
        x2, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b, scaling,
        activation, output)
    return y.reshape(*shape[:-1], y.shape[-1])


def lora_linear_reference(x, w, a, b, scaling):
    """peft's LoRA Linear: base in x's dtype, LoRA path in the adapter's dtype, cast back; a plain
    Linear in x's dtype when a and b are None."""
    if isinstance(w, NF4Weight):
        w = dequantize_nf4_reference(w, x.dtype)
    base = F.linear(x, w.to(x.dtype))
    if a is None:
        return base
    xl = x.to(a.dtype)
    return base + (F.linear(F.linear(xl, a), b) * scaling).to(x.dtype)


def lora_mlp_reference(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b,
                       scaling, activation="silu"):
    """Plain eager PyTorch + peft-style unfused LoRA on each projection."""
    g = lora_linear_reference(x, gate_w, gate_a, gate_b, scaling)
    u = lora_linear_reference(x, up_w, up_a, up_b, scaling)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    return lora_linear_reference(act * u, down_w, down_a, down_b, scaling)
