"""SwiGLU activation ``c = silu(a) * b`` (``a`` = gate projection, ``b`` = up projection).

Forward reads ``a`` and ``b`` once and writes ``c``; backward reads ``dc``, ``a`` and ``b`` and
writes

    db = dc * silu(a)
    da = dc * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))

in place over ``a`` and ``b``: those saved activations are dead once their gradients exist, so
the backward allocates nothing (the trick Liger and Unsloth use). The version counters of ``a``
and ``b`` are bumped after the overwrite, so a second backward through the same graph
(``retain_graph=True``) or any other consumer that saved them fails loudly instead of reading
gradients as activations. All arithmetic is float32; each output is rounded once (transformers
rounds ``silu(a)`` to the input dtype before the multiply, so bf16 results differ from HF's by
that one extra rounding, and ours are the closer to exact).

``a`` and ``b`` may be any ``(..., I)`` tensors with a unit last stride, e.g. the two halves of
a fused gate-up projection (row stride ``2 I``).
"""
import torch
import triton
import triton.language as tl
from torch import nn

BLOCK = 1024  # columns per program: 8 bf16 elements (16 bytes) per thread at 4 warps
NUM_WARPS = 4


@triton.jit
def _swiglu_forward_kernel(C, c_rs, A, a_rs, B, b_rs, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * a_rs + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * b_rs + cols, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C + row * c_rs + cols, c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    DA, da_rs, DB, db_rs, DC, dc_rs, A, a_rs, B, b_rs, n_cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dc = tl.load(DC + row * dc_rs + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * a_rs + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * b_rs + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    db = dc * silu
    da = dc * b * (sig + silu * (1.0 - sig))
    tl.store(DA + row * da_rs + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * db_rs + cols, db.to(DB.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, I) view with unit column stride; copies only when the layout allows no such view."""
    if t.dim() >= 2 and t.stride(-1) == 1:
        try:
            return t.view(-1, t.shape[-1])
        except RuntimeError:  # leading dims not mergeable into one stride
            pass
    return t.reshape(-1, t.shape[-1]).contiguous()


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"gate {tuple(a.shape)} {a.dtype} and up {tuple(b.shape)} {b.dtype} must match")


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the forward; returns a new contiguous ``c`` of ``a``'s shape."""
    _check(a, b)
    a2, b2 = _rows(a), _rows(b)
    n_rows, n_cols = a2.shape
    c = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device)
    grid = (n_rows, triton.cdiv(n_cols, BLOCK))
    _swiglu_forward_kernel[grid](c, c.stride(0), a2, a2.stride(0), b2, b2.stride(0), n_cols, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return c.view(a.shape)


def launch_gated_backward(kernel, dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, in_place: bool,
                          **constexprs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a gated activation's backward ``kernel``; ``(da, db)`` written over ``a``, ``b`` when ``in_place``.

    Shared by SwiGLU and GeGLU, whose backward kernels take the same arguments.
    """
    a2, b2, dc2 = _rows(a), _rows(b), _rows(dc)
    n_rows, n_cols = a2.shape
    # In place only where a and b are distinct buffers that _rows did not copy.
    in_place = in_place and a2.data_ptr() == a.data_ptr() and b2.data_ptr() == b.data_ptr()
    in_place = in_place and a.data_ptr() != b.data_ptr()
    da2, db2 = (a2, b2) if in_place else (torch.empty_like(a2), torch.empty_like(b2))
    grid = (n_rows, triton.cdiv(n_cols, BLOCK))
    kernel[grid](
        da2, da2.stride(0), db2, db2.stride(0), dc2, dc2.stride(0), a2, a2.stride(0), b2, b2.stride(0),
        n_cols, BLOCK=BLOCK, num_warps=NUM_WARPS, **constexprs,
    )
    if in_place:
        torch.autograd.graph.increment_version(a)
        torch.autograd.graph.increment_version(b)
        # Detached aliases: a gradient must not carry the autograd view history of the
        # activation whose memory it took (a chunk of a fused gate-up output, say).
        return a.detach(), b.detach()
    return da2.view(a.shape), db2.view(b.shape)


def swiglu_backward(
    dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, in_place: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns ``(da, db)``, written over ``a`` and ``b`` when ``in_place``."""
    return launch_gated_backward(_swiglu_backward_kernel, dc, a, b, in_place)


class TunedagSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        c = swiglu_forward(a, b)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da, db = swiglu_backward(dc, a, b)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``; the backward overwrites ``a`` and ``b`` with their gradients."""
    return TunedagSwiGLUFunction.apply(a, b)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, as ``LlamaMLP``: ``ACT2FN["silu"](gate) * up``."""
    return nn.functional.silu(a) * b


class TunedagSwiGLUMLP(nn.Module):
    """Drop-in for ``LlamaMLP(config)``: the same projections, our activation between them."""

    def __init__(self, config) -> None:
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"TunedagSwiGLUMLP needs hidden_act 'silu', got {config.hidden_act!r}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
