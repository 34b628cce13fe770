"""Fused lm_head + cross-entropy: the loss from hidden states without the full [N, V] logits.

``loss = CE(softcap(h @ W.T + b), target)`` over N tokens, hidden size H, vocab V. Eager code
materialises the logits (N x V in the model dtype), an fp32 copy for the loss, its softmax
and the fp32 gradient: at Llama-3.1-8B's V = 128256 and N = 16384 that is ~8.4 GB per fp32
copy. Here tokens go through in chunks of ``chunk_rows`` rows (Liger Kernel's approach): for
each chunk

1. ``logits = h_c @ W.T (+ b)`` with cuBLAS, in the input dtype (c x V);
2. one Triton program per row reads the row twice: an online log-sum-exp over the vocab in
   blocks (max and rescaled sum in fp32), then ``dlogits = (softmax - onehot(target)) * scale``
   (times ``1 - tanh^2`` under softcapping), written over the logits in place;
3. ``grad_h_c = dlogits @ W``, ``grad_W += dlogits.T @ h_c``, ``grad_b += dlogits.sum(0)``.

So the gradients are finished when the forward returns; backward only multiplies them by the
incoming gradient when it is not 1. Peak extra memory is one chunk of logits plus the
gradients themselves (grad_W only when the lm_head is trained; it is frozen under LoRA).

Numerics: logits are rounded to the input dtype once, as eager ``lm_head(h).float()`` does;
log-sum-exp, softmax and softcapping run in fp32; dlogits are rounded to the input dtype
before the two gradient matmuls (as eager autograd's bf16 grad of bf16 logits). ``grad_W`` is
accumulated in W's dtype with ``addmm_`` (fp32 accumulation inside each chunk's matmul, one
rounding per chunk), ``grad_b`` in fp32.

Reductions: ``'sum'``, or ``'mean'`` = sum over non-ignored tokens divided by
``num_items_in_batch`` when given (the token count of the whole accumulated batch, so that
micro-batch losses add up to the true token mean) else by this call's non-ignored count
(clamped to 1: a batch with every target ignored gives loss 0 and zero gradients, not NaN).
Targets are aligned with rows (shift labels before calling). ``ignore_index`` rows
contribute nothing.

Per-token log-probs (``fused_linear_token_logps``, preference training): the same chunks and
row kernel give ``log p(target_t | h_t) = -CE_t`` per row, (N,) fp32, 0 at ``ignore_index``.
Its upstream gradient is per token (DPO weights each token by its sequence's coefficient), so
the kernel's gradient scale can be one value per row. With a frozen lm_head (LoRA) the rows are
independent: forward computes ``d logp / d h`` as the loss does and backward scales each row
(two matmuls per chunk in all; grad_h is rounded to the input dtype, then once more by the
scaling). A trained lm_head or bias sums over rows, so forward keeps only the log-probs and
backward recomputes each chunk's logits with the rows' upstream gradients as scales (one more
logits matmul than the loss, still one block of logits alive). Without gradients (the
reference model's pass) nothing is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._tl_math import tanh
from ._tl_rounding import cast_for_store

MIN_CHUNK_ROWS = 1024  # frozen lm_head (LoRA)
MIN_CHUNK_ROWS_WEIGHT_GRAD = 2048  # trained lm_head: grad_W += ... once per chunk
MAX_BLOCK_V = 4096


def chunk_rows_for(n_rows: int, hidden: int, vocab: int, weight_grad: bool = False) -> int:
    """Rows per chunk: ``clamp(next_pow2(ceil(N * H / V)), floor, next_pow2(N))``.

    floor = 1024 for a frozen lm_head, 2048 when the lm_head is trained.

    Two constraints set it:

    - memory: one chunk of logits (c x V) should cost no more than the hidden states it comes
      from (N x H), Liger's rule, so c ~ N * H / V. The loss then never needs more than about
      twice the activation memory it is fed;
    - speed: the logits matmul reads W (V x H) once per chunk for 2 * c * V * H FLOPs, i.e.
      c FLOP per byte of bf16 W, and ``grad_W += dlogits.T @ h_c`` reads and writes grad_W for
      the same FLOPs, c / 2 FLOP per byte. An H200 needs ~210 FLOP/byte (990 TFLOP/s over
      4.8 TB/s) to be matmul-bound: c = 1024 keeps the logits GEMM (1024 FLOP/byte) well
      clear of it, and a trained head takes c = 2048 so that the grad_W update (1024
      FLOP/byte) is as well. Measured on an H200 (scripts/bench_fused_kernels.py, 2026-11-29):
      frozen head, N = 16384: c = 512 / 1024 / 2048 / 4096 -> 58.1 / 55.0 / 55.6 / 56.1 ms;
      trained head: 93.5 / 86.7 / 82.9 / 82.6 ms (N = 4096: 23.3 / 23.4 / 22.3 / 20.5 ms).

    Worked example, Llama-3.1-8B (H = 4096, V = 128256) at 4 x 4096 = 16384 tokens:
    N * H / V = 16384 * 4096 / 128256 = 523.3 -> 524 -> next power of two 1024 (also the floor):
    16 chunks of 1024 rows; one chunk's bf16 logits are 1024 * 128256 * 2 B = 263 MB, against
    16384 * 128256 * 4 B = 8.4 GB for one fp32 copy of the full logits in eager code.
    At 4096 tokens the memory rule gives 131 -> 256 rows, the floor raises it to 1024
    (4 chunks, still 263 MB); with a trained head, 2048 rows (2 chunks, 526 MB). A small vocab
    moves it up: V = 32000, N = 65536, H = 8192 gives 16777 -> 32768 rows (2 chunks, 2.1 GB of
    logits against 1.07 GB of hidden states).
    """
    if n_rows <= 0:
        return 1
    by_memory = triton.next_power_of_2(triton.cdiv(n_rows * hidden, vocab))
    floor = MIN_CHUNK_ROWS_WEIGHT_GRAD if weight_grad else MIN_CHUNK_ROWS
    return min(max(by_memory, floor), triton.next_power_of_2(n_rows))


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, stride_row, target_ptr, loss_ptr, scale_ptr,
    n_cols, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: loss = lse(z) - z[target], z = softcap(logits); optionally dlogits in place."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    t_idx = tl.where(valid, target, 0)

    # Pass 1: online max / sum of exp over the vocab in BLOCK_V blocks (fp32).
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * tanh(x / softcap)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    x_t = tl.load(base + t_idx).to(tl.float32)
    if HAS_SOFTCAP:
        x_t = softcap * tanh(x_t / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: d loss_row * scale / d logits = (softmax - onehot) * scale * dz/dlogits.
        if SCALE_PER_ROW:
            row_scale = tl.load(scale_ptr + row)
        else:
            row_scale = tl.load(scale_ptr)
        row_scale = tl.where(valid, row_scale, 0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = tanh(x / softcap)
                x = softcap * t
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            g = g * row_scale
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(base + cols, cast_for_store(g, logits_ptr), mask=mask)


def cross_entropy_rows_(
    logits: torch.Tensor, target: torch.Tensor, loss_out: torch.Tensor, scale: torch.Tensor,
    ignore_index: int, softcap: float | None, compute_grad: bool, scale_per_row: bool = False,
) -> None:
    """Launch the row kernel on a (c, V) contiguous logits chunk; overwrites it with dlogits.

    ``scale``: (1,) fp32 for every row, or with ``scale_per_row`` (c,) fp32, one per row."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), target, loss_out, scale,
        vocab, ignore_index, float(softcap or 0.0),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, SCALE_PER_ROW=scale_per_row,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


def _head_chunks(hidden, weight, bias, chunk_rows):
    """(start, end, hidden rows, their logits) per chunk; the caller drops each (c, V) block."""
    w_t = weight.t()
    for s in range(0, hidden.shape[0], chunk_rows):
        e = min(s + chunk_rows, hidden.shape[0])
        h_c = hidden[s:e]
        yield s, e, h_c, (torch.addmm(bias, h_c, w_t) if bias is not None else h_c @ w_t)


def _add_chunk_grads(dlogits, h_c, weight, grad_h_c, grad_w, grad_b) -> None:
    """grad_h_c = dlogits @ W; grad_W += dlogits.T @ h_c; grad_b += column sums (those not None)."""
    if grad_h_c is not None:
        torch.mm(dlogits, weight, out=grad_h_c)  # (c, V) @ (V, H)
    if grad_w is not None:
        grad_w.addmm_(dlogits.t(), h_c)  # (V, c) @ (c, H)
    if grad_b is not None:
        grad_b += dlogits.sum(0, dtype=torch.float32)


def _loss_scale(target, ignore_index, reduction, num_items_in_batch) -> torch.Tensor:
    """(1,) fp32 on target's device: 1 / denominator for 'mean', 1 for 'sum'; no host sync."""
    dev = target.device
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=dev)
    if num_items_in_batch is None:
        denom = (target != ignore_index).sum().clamp_min(1).float()
    else:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=dev)
    return (1.0 / denom).reshape(1)


class TunedagFusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction,
                num_items_in_batch, softcap, chunk_rows):
        n, h = hidden.shape
        v = weight.shape[0]
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        compute_grad = need_h or need_w or need_b
        scale = _loss_scale(target, ignore_index, reduction, num_items_in_batch)
        loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_b else None
        c = chunk_rows or chunk_rows_for(n, h, v, weight_grad=need_w)
        for s, e, h_c, logits in _head_chunks(hidden, weight, bias, c):
            cross_entropy_rows_(logits, target[s:e], loss_rows[s:e], scale, ignore_index,
                                softcap, compute_grad)
            _add_chunk_grads(logits, h_c, weight, grad_h[s:e] if need_h else None, grad_w, grad_b)
            del logits
        loss = loss_rows.sum() * scale[0]
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # one host sync, like Liger
            grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
            grad_b = grad_b * grad_out if grad_b is not None else None
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, None, grad_b, None, None, None, None, None


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_args(hidden, weight, target, softcap):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match lm_head weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1].numel() != target.numel():
        raise ValueError(
            f"{hidden.shape[:-1].numel()} hidden rows but {target.numel()} targets "
            "(shift labels before calling)"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Scalar fp32 loss of ``softcap(hidden @ weight.T + bias)`` against ``target``.

    hidden (..., H), weight (V, H), target (...) int64 aligned with hidden's rows.
    ``chunk_rows`` overrides ``chunk_rows_for`` (tests use it to force several chunks).
    """
    _check_reduction(reduction)
    _check_args(hidden, weight, target, softcap)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    target = target.reshape(-1).contiguous()
    return TunedagFusedLinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, ignore_index, reduction, num_items_in_batch, softcap,
        chunk_rows,
    )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Eager PyTorch, as Hugging Face models compute it: full logits, upcast to fp32."""
    _check_reduction(reduction)
    _check_args(hidden, weight, target, softcap)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    target = target.reshape(-1)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    if num_items_in_batch is None:
        return loss / (target != ignore_index).sum().clamp_min(1)
    return loss / num_items_in_batch


def _token_logps_rows(hidden, weight, target, bias, ignore_index, softcap, chunk_rows,
                      grad_h=None) -> torch.Tensor:
    """(N,) fp32 log-probs; fills ``grad_h`` (N, H) with d logp_t / d h_t when given."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    minus_one = torch.full((1,), -1.0, dtype=torch.float32, device=hidden.device)  # d(-CE)/d CE
    for s, e, _, logits in _head_chunks(hidden, weight, bias, chunk_rows):
        cross_entropy_rows_(logits, target[s:e], out[s:e], minus_one, ignore_index, softcap,
                            grad_h is not None)
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[s:e])
        del logits
    return out.neg_()  # the kernel writes CE_t


class TunedagFusedLinearTokenLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, softcap, chunk_rows):
        n, h = hidden.shape
        _, need_w, _, need_b = ctx.needs_input_grad[:4]
        ctx.recompute = need_w or need_b  # gradients summed over rows need the upstream first
        c = chunk_rows or chunk_rows_for(n, h, weight.shape[0], weight_grad=need_w)
        ctx.args = (ignore_index, softcap, c)
        if ctx.recompute:
            ctx.save_for_backward(hidden, weight, target, bias)
            return _token_logps_rows(hidden, weight, target, bias, ignore_index, softcap, c)
        grad_h = torch.empty_like(hidden)
        out = _token_logps_rows(hidden, weight, target, bias, ignore_index, softcap, c, grad_h)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.recompute:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None, None, None
        hidden, weight, target, bias = ctx.saved_tensors
        ignore_index, softcap, c = ctx.args
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        scale = grad_out.float().neg().contiguous()  # per row: d loss / d logp_t = -d loss / d CE_t
        scratch = torch.empty_like(scale)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
        for s, e, h_c, logits in _head_chunks(hidden, weight, bias, c):
            cross_entropy_rows_(logits, target[s:e], scratch[s:e], scale[s:e], ignore_index, softcap,
                                True, scale_per_row=True)
            _add_chunk_grads(logits, h_c, weight, grad_h[s:e] if need_h else None, grad_w, grad_b)
            del logits
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, None, grad_b, None, None, None


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """fp32 ``log_softmax(softcap(hidden @ weight.T + bias))[target]`` per row, shaped like ``target``.

    hidden (..., H), weight (V, H), target (...) aligned with hidden's rows; ``ignore_index``
    rows give 0 and no gradient. Without gradients enabled (or none wanted) it saves nothing.
    """
    _check_args(hidden, weight, target, softcap)
    shape = target.shape
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    target = target.reshape(-1).contiguous()
    args = (hidden, weight, target, bias, ignore_index, softcap)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return TunedagFusedLinearTokenLogpsFunction.apply(*args, chunk_rows).reshape(shape)
    c = chunk_rows or chunk_rows_for(hidden.shape[0], hidden.shape[1], weight.shape[0])
    return _token_logps_rows(*args, c).reshape(shape)


def fused_linear_token_logps_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Eager PyTorch: full fp32 logits, log-softmax, the target's entry (0 at ``ignore_index``)."""
    _check_args(hidden, weight, target, softcap)
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = target != ignore_index
    logp = logits.log_softmax(-1).gather(-1, torch.where(valid, target, 0)[..., None])[..., 0]
    return torch.where(valid, logp, 0.0)
