"""GeGLU activation ``c = gelu(a) * b``, exact (erf) or tanh-approximate, as Gemma's MLP uses.

    exact:  gelu(a)  = a * Phi(a),  Phi(a) = (1 + erf(a / sqrt 2)) / 2
            gelu'(a) = Phi(a) + a * exp(-a^2 / 2) / sqrt(2 pi)
    tanh:   gelu(a)  = a * (1 + t) / 2,  t = tanh(z),  z = sqrt(2 / pi) * (a + 0.044715 a^3)
            gelu'(a) = (1 + t) / 2 + a * (1 - t^2) / 2 * sqrt(2 / pi) * (1 + 3 * 0.044715 a^2)

The tanh form is computed as ``(1 + t) / 2 = sigmoid(2 z)`` and ``1 - t^2 = 4 s (1 - s)``: from
``exp`` alone (the Triton interpreter has no libdevice ``tanh``), and without the cancellation of
``1 + t`` where ``t -> -1``. ``erf`` is ``tl.math.erf``, which the interpreter and the GPU
backends both provide. The memory pattern is SwiGLU's: forward reads ``a``, ``b`` and
writes ``c``; backward reads ``dc``, ``a``, ``b`` and writes ``da``, ``db`` over ``a`` and ``b``
(see :mod:`swiglu` for why that is safe and how misuse is caught). Float32 arithmetic; each
output rounded once.
"""
import torch
import triton
import triton.language as tl
from torch import nn

from .swiglu import BLOCK, NUM_WARPS, _check, _rows, launch_gated_backward


_APPROXIMATIONS = {"none": 0, "tanh": 1}


@triton.jit
def _gelu_and_grad(a, TANH: tl.constexpr):
    """gelu(a) and gelu'(a) in float32."""
    if TANH:
        # (1 + tanh z) / 2 = sigmoid(2 z) and (1 - tanh^2 z) = 4 s (1 - s): no 1 + t cancellation
        # where tanh z -> -1, and no tanh (the interpreter has no libdevice).
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)  # sqrt(2 / pi) * (...)
        s = 1.0 / (1.0 + tl.exp(-2.0 * z))
        gelu = a * s
        grad = s + 2.0 * a * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        gelu = a * cdf
        grad = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return gelu, grad


@triton.jit
def _geglu_forward_kernel(C, c_rs, A, a_rs, B, b_rs, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * a_rs + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * b_rs + cols, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(a, TANH)
    tl.store(C + row * c_rs + cols, (gelu * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_backward_kernel(
    DA, da_rs, DB, db_rs, DC, dc_rs, A, a_rs, B, b_rs, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dc = tl.load(DC + row * dc_rs + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * a_rs + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * b_rs + cols, mask=mask, other=0.0).to(tl.float32)
    gelu, grad = _gelu_and_grad(a, TANH)
    tl.store(DA + row * da_rs + cols, (dc * b * grad).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * db_rs + cols, (dc * gelu).to(DB.dtype.element_ty), mask=mask)


def _tanh_flag(approximate: str) -> bool:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def geglu_forward(a: torch.Tensor, b: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Launch the forward; returns a new contiguous ``c`` of ``a``'s shape."""
    tanh = _tanh_flag(approximate)
    _check(a, b)
    a2, b2 = _rows(a), _rows(b)
    n_rows, n_cols = a2.shape
    c = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device)
    grid = (n_rows, triton.cdiv(n_cols, BLOCK))
    _geglu_forward_kernel[grid](
        c, c.stride(0), a2, a2.stride(0), b2, b2.stride(0), n_cols, TANH=tanh, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return c.view(a.shape)


def geglu_backward(
    dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, approximate: str = "none", in_place: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns ``(da, db)``, written over ``a`` and ``b`` when ``in_place``."""
    return launch_gated_backward(_geglu_backward_kernel, dc, a, b, in_place, TANH=_tanh_flag(approximate))


class TunedagGEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, approximate):
        c = geglu_forward(a, b, approximate)
        ctx.approximate = approximate
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da, db = geglu_backward(dc, a, b, ctx.approximate)
        return da, db, None


def geglu(a: torch.Tensor, b: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(a, approximate) * b``; the backward overwrites ``a`` and ``b`` with their gradients."""
    return TunedagGEGLUFunction.apply(a, b, approximate)


def geglu_reference(a: torch.Tensor, b: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch, as ``GemmaMLP``: ``gelu(gate, approximate) * up``."""
    return nn.functional.gelu(a, approximate=approximate) * b


# transformers' activation names -> the GELU form they compute
HF_GELU_ACTIVATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu_new": "tanh"}


class TunedagGEGLUMLP(nn.Module):
    """Drop-in for ``GemmaMLP(config)``: the same projections, our activation between them
    (``hidden_act`` 'gelu' -> exact, 'gelu_pytorch_tanh' / 'gelu_new' -> tanh form)."""

    def __init__(self, config) -> None:
        super().__init__()
        act = config.hidden_act
        if act not in HF_GELU_ACTIVATIONS:
            raise ValueError(f"TunedagGEGLUMLP needs a GELU hidden_act {sorted(HF_GELU_ACTIVATIONS)}, got {act!r}")
        self.approximate = HF_GELU_ACTIVATIONS[act]
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), self.approximate))
