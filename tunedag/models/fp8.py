"""fp8 training (``fp8: true``): linear layers compute their three matmuls in float8, as torchao's
'tensorwise' float8 training recipe (the one Axolotl's ``fp8`` turns on through accelerate) does.

Forward ``y = x Wᵀ``: x and W are cast to FP8 E4M3 with one dynamic scale each (scale = 448 / amax of
the whole tensor, computed in float32 at every call); backward: the output gradient is cast to FP8 E5M2
(scale 57344 / amax) and ``dx = dy W``, ``dW = dyᵀ x`` reuse the E4M3 x and W of the forward. Each
product is one ``torch._scaled_mm`` (float32 accumulation, the inverse scales applied to its output).

Which layers (accelerate's filter, which Axolotl uses): every ``nn.Linear`` whose input and output sizes
are multiples of 16, except the model's first linear layer and its last (``lm_head``), kept in bf16 for
stability. Float8 matmuls need a GPU of compute capability 8.9 or newer: :func:`require_fp8_device`
refuses others when training starts. The weights stay in their own dtype (fp32 masters, bf16 under
FSDP's mixed precision) and are cast at each call, so checkpoints and the saved model are plain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunedag.errors import TunedagError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12  # torchao's floor on amax: an all-zero tensor gets a finite scale
ALIGN = 16  # _scaled_mm wants every dimension a multiple of 16


class Fp8Error(TunedagError, RuntimeError):
    """fp8 training asked for where float8 matmuls cannot run."""


def require_fp8_device(device: torch.device) -> None:
    """Stop, saying why, unless ``device`` is a CUDA GPU with float8 tensor cores (compute capability >= 8.9)."""
    if device.type != "cuda":
        raise Fp8Error(f"fp8: true computes matmuls in float8, which needs a CUDA GPU of compute capability 8.9 "
                       f"or newer (Ada, Hopper, Blackwell); this run trains on {device.type}. Remove fp8 to train "
                       "in bf16/fp32")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise Fp8Error(f"fp8: true needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) for "
                       f"float8 matmuls; {torch.cuda.get_device_name(device)} is {major}.{minor}. Remove fp8 to "
                       "train in bf16")


def fp8_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dynamic per-tensor scale that maps max |t| to the largest ``dtype`` value (float32, 0-dim)."""
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32)  # max |t|, one read
    return torch.finfo(dtype).max / amax.clamp(min=AMAX_EPS)


def scale_to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-limit, limit).to(dtype)


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``t`` cast to ``dtype`` with one dynamic per-tensor scale, the inverse scale, float32)."""
    scale = fp8_scale(t, dtype)
    return scale_to_fp8(t, scale, dtype), scale.reciprocal()


_fused_scale_to_fp8 = None


def cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`to_fp8`; on CUDA the scaling pass (multiply, clamp, cast: exact operations) is compiled once
    into one fused kernel, as torchao's float8 training relies on torch.compile for (eager, the casts take
    longer than the matmuls). The scale stays eager: compiled divisions may round differently."""
    global _fused_scale_to_fp8
    if not t.is_cuda:
        return to_fp8(t, dtype)
    if _fused_scale_to_fp8 is None:
        _fused_scale_to_fp8 = torch.compile(scale_to_fp8, dynamic=True)
    scale = fp8_scale(t, dtype)
    return _fused_scale_to_fp8(t, scale, dtype), scale.reciprocal()


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``(a · a_inv) @ (b · b_inv)`` from float8 ``a`` (m, k) and ``b`` (k, n): one ``_scaled_mm``, which
    wants ``a`` row-major and ``b`` column-major."""
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                            out_dtype=out_dtype)


class Fp8Matmul(torch.autograd.Function):
    """``x Wᵀ`` (x: (m, k) with m a multiple of 16, W: (n, k)) in float8: E4M3 forward, E5M2 gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = cast(x, E4M3)
        w8, w_inv = cast(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, weight.dtype)
        return scaled_mm(x8, x_inv, w8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = cast(grad, E5M2)
        grad_x = scaled_mm(g8, g_inv, w8, w_inv, x_dtype)  # (m, n) @ (n, k)
        grad_w = scaled_mm(g8.t(), g_inv, x8, x_inv, torch.float32).to(w_dtype)  # (n, m) @ (m, k)
        return grad_x, grad_w, None


class Float8Linear(torch.nn.Linear):
    """``nn.Linear`` with the same parameters whose matmul runs in float8 (:class:`Fp8Matmul`); the bias
    is added in the output dtype. Rows are zero-padded to a multiple of 16 (zeros change no amax and add
    nothing to the weight gradient)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        rows = x.reshape(-1, self.in_features)
        pad = -rows.shape[0] % ALIGN
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        y = Fp8Matmul.apply(rows, self.weight, out_dtype)[: rows.shape[0] - pad]
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def convert_to_fp8(model: torch.nn.Module) -> list[str]:
    """Swap the linear layers fp8 trains (see the module docstring) for :class:`Float8Linear` in place;
    their names."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    chosen = [(name, m) for name, m in linears[1:-1]
              if m.in_features % ALIGN == 0 and m.out_features % ALIGN == 0]
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Float8Linear(linear))
    return [name for name, _ in chosen]
