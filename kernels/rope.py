"""Rotary position embedding for q and k in one launch, in place, with a hand-written backward.

Layout is Hugging Face's "rotate half": a head vector ``v`` of width ``D`` is split into halves
``v1 = v[:D/2]``, ``v2 = v[D/2:]`` and

    out1 = v1 * cos1 - v2 * sin1
    out2 = v2 * cos2 + v1 * sin2

where ``cos = [cos1, cos2]`` and ``sin = [sin1, sin2]`` are the rows HF's rotary module returns
(the two halves are equal there; the kernel reads both so any ``cos``/``sin`` gives HF's
result). The backward is the transposed map, ``dv1 = g1 * cos1 + g2 * sin2`` and
``dv2 = g2 * cos2 - g1 * sin1``: for HF's equal halves, the rotation by ``-sin``.

``cos``/``sin`` are ``(batch or 1, seq, D)`` (or ``(seq, D)``) rows computed from
``position_ids``: for packed sequences the positions restart at 0 at every document, so each
document is rotated exactly as if it were alone. :func:`rope_cos_sin` builds them (float32
math, like ``LlamaRotaryEmbedding.forward``) from the inverse frequencies of
:func:`default_inv_freq` or :func:`llama3_inv_freq` (Llama 3.1's frequency scaling).

q is ``(batch, q_heads, seq, D)`` and k ``(batch, kv_heads, seq, D)`` as HF passes them (any
strides with a unit last stride, e.g. the transposed view of the projection output); with GQA
the head counts differ. One program handles one token: it loads that token's ``cos``/``sin``
row once and rotates every q and k head of it. All arithmetic is float32; results are rounded
once to q's dtype.
"""
import math

import torch
import triton
import triton.language as tl

NUM_WARPS = 4  # per program (one token: all its q and k heads)


@triton.jit
def _rotate_heads(
    IN, in_sh, OUT, out_sh, n_heads, cos1, cos2, sin1, sin2, cols, cmask, half,
    BLOCK_H: tl.constexpr,
):
    """Rotate ``n_heads`` head vectors of one token (pointers at head 0, column 0)."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        m = (heads < n_heads)[:, None] & cmask[None, :]
        in_off = heads[:, None].to(tl.int64) * in_sh + cols[None, :]
        out_off = heads[:, None].to(tl.int64) * out_sh + cols[None, :]
        v1 = tl.load(IN + in_off, mask=m, other=0.0).to(tl.float32)
        v2 = tl.load(IN + in_off + half, mask=m, other=0.0).to(tl.float32)
        o1 = v1 * cos1[None, :] + v2 * sin1[None, :]
        o2 = v2 * cos2[None, :] + v1 * sin2[None, :]
        tl.store(OUT + out_off, o1.to(OUT.dtype.element_ty), mask=m)
        tl.store(OUT + out_off + half, o2.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    QI, qi_sb, qi_sh, qi_ss, QO, qo_sb, qo_sh, qo_ss,
    KI, ki_sb, ki_sh, ki_ss, KO, ko_sb, ko_sh, ko_ss,
    COS, SIN, cs_sb, cs_ss,
    seq_len, n_q_heads, n_k_heads, half,
    BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < half
    cs = b * cs_sb + s * cs_ss + cols
    cos1 = tl.load(COS + cs, mask=cmask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs + half, mask=cmask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs, mask=cmask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs + half, mask=cmask, other=0.0).to(tl.float32)
    # out1 = v1 * A1 + v2 * B1, out2 = v2 * A2 + v1 * B2
    if BACKWARD:  # transpose of the forward map
        b1 = sin2
        b2 = -sin1
    else:
        b1 = -sin1
        b2 = sin2
    _rotate_heads(QI + b * qi_sb + s * qi_ss, qi_sh, QO + b * qo_sb + s * qo_ss, qo_sh, n_q_heads,
                  cos1, cos2, b1, b2, cols, cmask, half, BLOCK_H=BLOCK_QH)
    _rotate_heads(KI + b * ki_sb + s * ki_ss, ki_sh, KO + b * ko_sb + s * ko_ss, ko_sh, n_k_heads,
                  cos1, cos2, b1, b2, cols, cmask, half, BLOCK_H=BLOCK_KH)


def _cos_sin_strides(cos: torch.Tensor, sin: torch.Tensor, batch: int, seq_len: int, head_dim: int):
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() != 3 or cos.shape[1:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos/sin must be (batch or 1, seq, head_dim) = ({batch}, {seq_len}, {head_dim}), "
            f"got {tuple(cos.shape)}"
        )
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    sb = cos.stride(0) if cos.shape[0] > 1 else 0
    return cos, sin, sb, cos.stride(1)


def _launch(q_in, q_out, k_in, k_out, cos, sin, backward: bool) -> None:
    batch, n_q_heads, seq_len, head_dim = q_in.shape
    n_k_heads = k_in.shape[1]
    if k_in.shape != (batch, n_k_heads, seq_len, head_dim):
        raise ValueError(f"k {tuple(k_in.shape)} does not match q {tuple(q_in.shape)} in batch, seq or head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    for t in (q_in, q_out, k_in, k_out):
        if t.stride(-1) != 1:
            raise ValueError("q and k need a unit stride along head_dim")
    cos, sin, cs_sb, cs_ss = _cos_sin_strides(cos, sin, batch, seq_len, head_dim)
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    # Bound the register tile to ~2k elements per half: loop over head blocks beyond that.
    max_heads = max(1, 2048 // block_d)
    block_qh = min(triton.next_power_of_2(n_q_heads), max_heads)
    block_kh = min(triton.next_power_of_2(n_k_heads), max_heads)
    _rope_kernel[(batch * seq_len,)](
        q_in, *q_in.stride()[:3], q_out, *q_out.stride()[:3],
        k_in, *k_in.stride()[:3], k_out, *k_out.stride()[:3],
        cos, sin, cs_sb, cs_ss,
        seq_len, n_q_heads, n_k_heads, half,
        BACKWARD=backward, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill its memory exactly (any dimension order, no gaps or overlaps)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


class TunedagRopeFunction(torch.autograd.Function):
    """Rotates q and k in place and returns them.

    Autograd's ``mark_dirty`` cannot mark two views (q and k are views of the projection
    outputs in HF), so the in-place write is announced by bumping the tensors' version
    counters instead: if anything saved the unrotated q or k for its backward, that backward
    fails loudly ("modified by an inplace operation") rather than using rotated values.
    Nothing does in HF's attention (the projections save their inputs, not their outputs).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _launch(q, q, k, k, cos, sin, backward=False)
        torch.autograd.graph.increment_version(q)
        torch.autograd.graph.increment_version(k)
        ctx.save_for_backward(cos, sin)
        # Gradients go out in q's and k's own layout (HF: views of (B, S, H*D) projection
        # outputs), so the projections' backward needs no transposing copy.
        ctx.layouts = tuple(t.stride() if _is_dense(t) else None for t in (q, k))
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # Incoming gradients can be expanded (a .sum() gives stride-0 ones) or shared with other
        # nodes: read them as they are where the last stride is 1, and write fresh buffers.
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dq_out, dk_out = (
            torch.empty_strided(g.shape, layout, dtype=g.dtype, device=g.device) if layout else torch.empty_like(g)
            for g, layout in zip((dq, dk), ctx.layouts)
        )
        _launch(dq, dq_out, dk, dk_out, cos, sin, backward=True)
        return dq_out, dk_out, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to ``q (B, Hq, S, D)`` and ``k (B, Hk, S, D)`` in place.

    ``cos``/``sin``: ``(B or 1, S, D)`` or ``(S, D)``, e.g. from :func:`rope_cos_sin`. Returns
    ``(q, k)`` (the same tensors, rotated). The inputs must not be needed unrotated afterwards.
    """
    for name, t in (("q", q), ("k", k)):
        base = t if t._base is None else t._base
        if base.is_leaf and base.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"rope rotates {name} in place: pass a computed tensor, not a leaf that requires grad (or a view of one)"
            )
    return TunedagRopeFunction.apply(q, k, cos, sin)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (in place on q and k).

    ``unsqueeze_dim=1``: q/k are ``(B, H, S, D)``; ``unsqueeze_dim=2``: ``(B, S, H, D)``.
    """
    if unsqueeze_dim == 1:
        return rope(q, k, cos, sin)
    if unsqueeze_dim == 2:
        q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    raise ValueError(f"unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1`` (out of place)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def default_inv_freq(head_dim: int, rope_theta: float, device=None) -> torch.Tensor:
    """``1 / theta ** (2i / D)`` for ``i < D/2`` in float32, as transformers computes it."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim
    return 1.0 / (rope_theta ** exponents)


def llama3_inv_freq(
    head_dim: int,
    rope_theta: float = 500000.0,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
    device=None,
) -> torch.Tensor:
    """Llama 3.1 frequency scaling, the same steps as transformers' ``_compute_llama3_parameters``.

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency, those longer
    than ``original / low_freq_factor`` are slowed by ``factor``, and the band between is a
    linear blend of the two in ``original / wavelength``. The defaults are Llama-3.1-8B's.
    """
    inv_freq = default_inv_freq(head_dim, rope_theta, device)
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of shape ``(B, S, D)`` from ``position_ids (B, S)``, as ``LlamaRotaryEmbedding``.

    For packed rows pass positions that restart at 0 per document (see :func:`packed_position_ids`).
    """
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def packed_position_ids(doc_lengths: list[int], device=None) -> torch.Tensor:
    """Positions ``(1, sum(doc_lengths))`` restarting at 0 at every document of a packed row."""
    return torch.cat([torch.arange(n, device=device) for n in doc_lengths]).unsqueeze(0)
