"""Attention over packed rows with no padding compute and no attention across samples.

A micro-batch of packed rows (B, T) is flattened to the N tokens that are not padding; each
sample is one *document* of consecutive tokens, and ``cu_seqlens`` (docs + 1,) marks where
documents start. q is (N, Hq, D), k and v are (N, Hk, D) (grouped-query attention when
Hq > Hk); query i sees key j when both are in one document, j <= i and, with a sliding
window W, i - j < W (transformers' ``sliding_window_overlay``).

Backends, chosen by device and features:

- CUDA, no logit softcap, every document of the micro-batch one length L (one document per row,
  or DPO's chosen and rejected of one length), no window shorter than L: cuDNN's dense causal
  attention over (documents, H, L, D), with grouped key/value heads (repeated to the query heads
  where cuDNN refuses them). On an H200 (torch 2.11) it runs forward + backward at 1.8x the varlen
  kernel's rate for 4 x 4096 tokens and 1.6x for one 131,072-token document
  (``scripts/bench_attention.py``; BENCHMARKS.md).
- CUDA otherwise, no logit softcap: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2
  varlen kernel; causal via ``window_size=(-1, 0)``; GQA natively).
- CUDA, logit softcap (Gemma-2): FlexAttention, compiled, with a same-document causal block
  mask and a ``tanh`` score_mod.
- CPU: plain PyTorch with a dense (N, N) mask, in fp32 (tests and the tiny built-in model).
- Attention sinks (gpt-oss: a learned per-head logit in every softmax denominator), on CUDA and under
  ``TRITON_INTERPRET=1``: tunedag's Triton kernel (``kernels/sink_attention.py``); else its reference.

Not used, on purpose: cuDNN's variable-length (ragged) attention (correct outputs but wrong
query and key gradients, and 3-28x slower than its dense kernels, on an H200 with torch 2.11:
``scripts/bench_attention.py``) and the memory-efficient SDPA backend (refuses GQA).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch

from tunedag.kernels.sink_attention import sink_attention, sink_attention_reference


@dataclass
class PackedSequences:
    """Where the real tokens of a packed micro-batch are and which document each belongs to."""

    keep: torch.Tensor  # (B*T,) bool on the compute device: flattened positions that are not padding
    doc: torch.Tensor  # (N,) int32: document index of each kept token
    position_ids: torch.Tensor  # (1, N) positions restarting at 0 per document
    cu_seqlens: torch.Tensor  # (docs + 1,) int32 document starts, then N
    max_len: int  # longest document
    doc_len: int | None = None  # the one length of every document, when they share one
    _masks: dict = field(default_factory=dict, repr=False)  # per-window mask cache (one batch)

    @property
    def n_tokens(self) -> int:
        return int(self.doc.numel())

    @classmethod
    def from_batch(cls, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                   device: torch.device) -> "PackedSequences":
        """From collate's (B, T) ``segment_ids`` (1.. per sample, 0 = padding) and positions.

        Computed on the host (the batch lives there) so no device sync is needed.
        """
        seg = segment_ids.cpu()
        b, t = seg.shape
        keep = (seg > 0).reshape(-1)
        row = torch.arange(b).repeat_interleave(t)
        key = (row * (int(seg.max()) + 1) + seg.reshape(-1))[keep]
        _, counts = torch.unique_consecutive(key, return_counts=True)
        cu = torch.zeros(counts.numel() + 1, dtype=torch.int32)
        cu[1:] = counts.cumsum(0)
        doc = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts)
        pos = position_ids.cpu().reshape(-1)[keep][None]
        equal = bool((counts == counts[0]).all())
        return cls(keep.to(device), doc.to(device), pos.to(device), cu.to(device), int(counts.max()),
                   int(counts[0]) if equal else None)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSequences,
                     scale: float, softcap: float | None = None, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(N, Hq, D) attention output for packed q (N, Hq, D), k/v (N, Hk, D); ``sinks`` (Hq,) sink logits."""
    if sinks is not None:
        if softcap is not None:
            raise ValueError("packed_attention: attention sinks with a logit softcap (no architecture has both)")
        if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            return sink_attention(q, k, v, sinks, seq.doc, seq.cu_seqlens, scale, window)
        return sink_attention_reference(q.float(), k.float(), v.float(), sinks, seq.doc, scale, window).to(q.dtype)
    if q.is_cuda and softcap is None:
        if seq.doc_len and (window is None or window >= seq.doc_len):
            return equal_docs_attention(q, k, v, seq.doc_len, scale)
        return _varlen(q, k, v, seq, scale, window)
    if q.is_cuda:
        return _flex(q, k, v, seq, scale, softcap, window)
    return dense_packed_attention(q, k, v, seq, scale, softcap, window)


def _varlen(q, k, v, seq, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scale}
    if "window_size" in params:  # HF's window W keeps keys i - W < j <= i: left size W - 1
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif window is None:
        kwargs["is_causal"] = True  # older torch: no windows
    else:
        return _flex(q, k, v, seq, scale, None, window)
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    cu = seq.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, seq.max_len, seq.max_len, **kwargs)


def equal_docs_attention(q, k, v, length: int, scale: float) -> torch.Tensor:
    """Causal attention within each consecutive run of ``length`` tokens, through dense SDPA on cuDNN.

    Where this torch's cuDNN path refuses grouped key/value heads, they are repeated to the query
    heads (a copy that lives as long as the layer's autograd state). Shapes cuDNN refuses (a head
    size over its limit, say) go to the dense flash kernel: the same result at the varlen speed.
    """
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    docs = q.shape[0] // length

    def dense(x):  # (N, H, D) -> (docs, H, L, D), a view
        return x.view(docs, length, *x.shape[1:]).transpose(1, 2)

    qd, kd, vd = dense(q), dense(k), dense(v)
    gqa = q.shape[1] != k.shape[1]
    if gqa and not can_use_cudnn_attention(SDPAParams(qd, kd, vd, None, 0.0, True, True), False):
        rep = q.shape[1] // k.shape[1]
        kd, vd, gqa = kd.repeat_interleave(rep, dim=1), vd.repeat_interleave(rep, dim=1), False
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                                               enable_gqa=gqa)
    return out.transpose(1, 2).reshape(q.shape)


_compiled_flex = None


def _flex(q, k, v, seq, scale, softcap, window):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    key = ("flex", window)
    if key not in seq._masks:
        doc = seq.doc

        def mask_mod(b, h, q_idx, kv_idx):
            ok = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
            if window:
                ok = ok & (q_idx - kv_idx < window)
            return ok

        n = seq.n_tokens
        seq._masks[key] = create_block_mask(mask_mod, None, None, n, n, device=q.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    score_mod = score_mod if softcap is not None else None

    out = _compiled_flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         score_mod=score_mod, block_mask=seq._masks[key], scale=scale,
                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def dense_packed_attention(q, k, v, seq: PackedSequences, scale: float, softcap: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """Reference: fp32 scores with a dense same-document causal (N, N) mask."""
    key = ("dense", window)
    if key not in seq._masks:
        n = seq.n_tokens
        i = torch.arange(n, device=q.device)
        allowed = (seq.doc[:, None] == seq.doc[None, :]) & (i[:, None] >= i[None, :])
        if window:
            allowed &= (i[:, None] - i[None, :]) < window
        seq._masks[key] = allowed
    rep = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).float()  # (Hq, N, D)
    kh = k.transpose(0, 1).float().repeat_interleave(rep, dim=0)
    vh = v.transpose(0, 1).float().repeat_interleave(rep, dim=0)
    scores = qh @ kh.transpose(1, 2) * scale  # (Hq, N, N)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~seq._masks[key], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh  # (Hq, N, D)
    return out.transpose(0, 1).to(q.dtype)
