"""Packed causal attention with attention sinks (gpt-oss), forward and backward, in Triton.

A sink is a learned logit ``s_h`` per query head that joins every query's softmax denominator
without a value: for query i over the keys j it may see,

    out_i = sum_j exp(x_ij - m) v_j / (exp(s_h - m) + sum_j exp(x_ij - m)),   x_ij = scale q_i . k_j

(transformers' ``eager_attention_forward`` for gpt-oss: the sink is one more softmax column, dropped
after the softmax). Queries see keys of their own document (``doc``), j <= i and, with a sliding
window W, i - j < W. q is (N, Hq, D), k and v (N, Hk, D) with Hq a multiple of Hk (GQA).

Flash-attention style: one program per (block of queries, head) streams the keys of the block's
documents with an online softmax that *starts* at the sink (running max s_h, running sum 1), so the
sink costs nothing per key, and keeps the log-sum-exp ``lse_i`` (N, Hq) for the backward.
Backward, with delta_i = dO_i . O_i: dx_ij = p_ij (dO_i . v_j - delta_i) as without sinks (the sink
is a column whose value is 0), and d s_h = -sum_i exp(s_h - lse_i) delta_i. dQ streams keys per
query block; dK and dV stream queries per key block, one program per *query* head, summed over the
heads of a group afterwards. Scores, softmax and accumulators are float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _scores(q, k_or_q, DOT_F32: tl.constexpr):
    """a (M, D) @ b (N, D)^T in float32 (exact float32 products when the inputs are float32)."""
    if DOT_F32:
        return tl.dot(q.to(tl.float32), tl.trans(k_or_q.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k_or_q))


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _allowed(rows, cols, doc_r, doc_c, n, WINDOW):
    """(len(rows), len(cols)) mask: same document, causal, inside the window (WINDOW 0: none)."""
    ok = (doc_r[:, None] == doc_c[None, :]) & (cols[None, :] <= rows[:, None]) & (cols[None, :] < n)
    ok = ok & (rows[:, None] < n)
    if WINDOW > 0:
        ok = ok & (rows[:, None] - cols[None, :] < WINDOW)
    return ok


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SINK, DOC, CU, n, n_heads, rep, head_dim, scale, WINDOW,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    first = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    kv_h = h // rep
    rows = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask, dmask = rows < n, d < head_dim
    q_stride, kv_stride = n_heads * head_dim, n_heads // rep * head_dim
    q = tl.load(Q + rows[:, None].to(tl.int64) * q_stride + h * head_dim + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    doc_r = tl.load(DOC + rows, mask=rmask, other=-1)
    lo = tl.load(CU + tl.load(DOC + first))  # start of the first query's document
    hi = tl.minimum(first + BLOCK_M, n)
    if WINDOW > 0:
        lo = tl.maximum(lo, first - WINDOW + 1)
    m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK + h).to(tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        kv_off = cols[:, None].to(tl.int64) * kv_stride + kv_h * head_dim + d[None, :]
        k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        doc_c = tl.load(DOC + cols, mask=cmask, other=-2)
        s = _scores(q, k, DOT_F32) * scale
        s = tl.where(_allowed(rows, cols, doc_r, doc_c, n, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at the sink
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, v, DOT_F32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None].to(tl.int64) * q_stride + h * head_dim + d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + rows.to(tl.int64) * n_heads + h, m_i + tl.log(l_i), mask=rmask)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, CU, n, n_heads, rep, head_dim, scale, WINDOW,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    first = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    kv_h = h // rep
    rows = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask, dmask = rows < n, d < head_dim
    q_stride, kv_stride = n_heads * head_dim, n_heads // rep * head_dim
    q_off = rows[:, None].to(tl.int64) * q_stride + h * head_dim + d[None, :]
    q_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + rows.to(tl.int64) * n_heads + h, mask=rmask, other=0.0)
    delta = tl.load(DELTA + rows.to(tl.int64) * n_heads + h, mask=rmask, other=0.0)
    doc_r = tl.load(DOC + rows, mask=rmask, other=-1)
    lo = tl.load(CU + tl.load(DOC + first))
    hi = tl.minimum(first + BLOCK_M, n)
    if WINDOW > 0:
        lo = tl.maximum(lo, first - WINDOW + 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        kv_off = cols[:, None].to(tl.int64) * kv_stride + kv_h * head_dim + d[None, :]
        k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        doc_c = tl.load(DOC + cols, mask=cmask, other=-2)
        s = _scores(q, k, DOT_F32) * scale
        p = tl.where(_allowed(rows, cols, doc_r, doc_c, n, WINDOW), tl.exp(s - lse[:, None]), 0.0)
        ds = p * (_scores(do, v, DOT_F32) - delta[:, None])
        dq += _mm(ds, k, DOT_F32)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, CU, n, n_heads, rep, head_dim, scale, WINDOW,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """dK, dV of one block of keys for one query head h: (N, Hq, D) float32, summed per group later."""
    first = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    kv_h = h // rep
    cols = first + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    cmask, dmask = cols < n, d < head_dim
    q_stride, kv_stride = n_heads * head_dim, n_heads // rep * head_dim
    kv_mask = cmask[:, None] & dmask[None, :]
    kv_off = cols[:, None].to(tl.int64) * kv_stride + kv_h * head_dim + d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    doc_c = tl.load(DOC + cols, mask=cmask, other=-2)
    last = tl.minimum(first + BLOCK_N, n) - 1
    lo = first
    hi = tl.load(CU + tl.load(DOC + last) + 1)  # end of the last key's document
    if WINDOW > 0:
        hi = tl.minimum(hi, last + WINDOW)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        q_off = rows[:, None].to(tl.int64) * q_stride + h * head_dim + d[None, :]
        q = tl.load(Q + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
        do = tl.load(DO + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(LSE + rows.to(tl.int64) * n_heads + h, mask=rmask, other=0.0)
        delta = tl.load(DELTA + rows.to(tl.int64) * n_heads + h, mask=rmask, other=0.0)
        doc_r = tl.load(DOC + rows, mask=rmask, other=-1)
        s_t = _scores(k, q, DOT_F32) * scale  # (keys, queries)
        ok_t = tl.trans(_allowed(rows, cols, doc_r, doc_c, n, WINDOW))
        p_t = tl.where(ok_t, tl.exp(s_t - lse[None, :]), 0.0)
        dv += _mm(p_t, do, DOT_F32)
        ds_t = p_t * (_scores(v, do, DOT_F32) - delta[None, :])
        dk += _mm(ds_t, q, DOT_F32)
    out_off = cols[:, None].to(tl.int64) * q_stride + h * head_dim + d[None, :]
    tl.store(DK + out_off, dk * scale, mask=kv_mask)
    tl.store(DV + out_off, dv, mask=kv_mask)


def _launch_args(q: torch.Tensor) -> dict:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block = 16 if interpreting else 64  # tl.dot's smallest tile; the interpreter runs programs one by one
    # the interpreter's bf16 dot is wrong (notes/triton.md), and float32 inputs mean exact float32 products
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                DOT_F32=interpreting or q.dtype == torch.float32)


class TunedagSinkAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, doc, cu_seqlens, scale, window):
        n, n_heads, head_dim = q.shape
        rep = n_heads // k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(n, n_heads, device=q.device, dtype=torch.float32)
        meta = _launch_args(q)
        grid = (triton.cdiv(n, meta["BLOCK_M"]), n_heads)
        _fwd_kernel[grid](q, k, v, out, lse, sinks, doc, cu_seqlens, n, n_heads, rep, head_dim, scale,
                          window, **meta)
        ctx.save_for_backward(q, k, v, out, lse, sinks, doc, cu_seqlens)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks, doc, cu = ctx.saved_tensors
        n, n_heads, head_dim = q.shape
        rep = n_heads // k.shape[1]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # (N, Hq)
        dsinks = -(torch.exp(sinks.float()[None] - lse) * delta).sum(0)
        meta = _launch_args(q)
        args = (n, n_heads, rep, head_dim, ctx.scale, ctx.window)
        dq = torch.empty_like(q)
        _dq_kernel[(triton.cdiv(n, meta["BLOCK_M"]), n_heads)](q, k, v, dout, lse, delta, dq, doc, cu, *args, **meta)
        dk = torch.empty(n, n_heads, head_dim, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        _dkdv_kernel[(triton.cdiv(n, meta["BLOCK_N"]), n_heads)](q, k, v, dout, lse, delta, dk, dv, doc, cu,
                                                                 *args, **meta)
        dk = dk.view(n, -1, rep, head_dim).sum(2).to(k.dtype)
        dv = dv.view(n, -1, rep, head_dim).sum(2).to(v.dtype)
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None, None


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, doc: torch.Tensor,
                   cu_seqlens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """(N, Hq, D) attention of packed q (N, Hq, D) over k, v (N, Hk, D) with per-head sink logits (Hq,).

    ``doc`` (N,) int32 is each token's document, ``cu_seqlens`` (docs + 1,) int32 the document starts.
    """
    n, n_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != head_dim or n_heads % k.shape[1]:
        raise ValueError(f"sink_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(N, Hq, D), (N, Hk, D), (N, Hk, D) with Hq a multiple of Hk")
    if sinks.shape != (n_heads,):
        raise ValueError(f"sink_attention: sinks {tuple(sinks.shape)} must hold one logit per query head ({n_heads})")
    if doc.shape != (n,) or doc.dtype != torch.int32 or cu_seqlens.dtype != torch.int32:
        raise ValueError("sink_attention: doc must be (N,) int32 and cu_seqlens int32")
    if n == 0:
        return q.new_empty(q.shape)
    return TunedagSinkAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks, doc,
                                              cu_seqlens, float(scale), int(window or 0))


def sink_attention_reference(q, k, v, sinks, doc, scale, window=None):
    """Plain PyTorch in q's dtype (float32 or float64): the sink as an extra softmax column, then dropped."""
    n = q.shape[0]
    i = torch.arange(n, device=q.device)
    allowed = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    rep = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)  # (Hq, N, D)
    kh = k.transpose(0, 1).repeat_interleave(rep, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(rep, dim=0)
    scores = (qh @ kh.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # (Hq, N, N)
    sink = sinks.to(scores.dtype)[:, None, None].expand(-1, n, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ vh).transpose(0, 1)
