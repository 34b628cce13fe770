"""Fake quantization for quantization-aware training: a tensor rounded to a low-precision grid and
returned in its own dtype, with a straight-through gradient.

The grids are those torchao's QAT simulates for the formats Axolotl's ``qat`` names (the model is
later quantized to them for serving):

- ``int4`` weights: asymmetric (min-max) per group of ``group_size`` along the input dimension, as
  torchao's ``Int4WeightFakeQuantizeConfig`` with bf16 activations does for Axolotl's int4/int8 ``qat``:
  scale = max(max - min, 1e-6) / 15, zero = min + 8·scale, q = clamp(round((w - min) / scale), 0, 15),
  w' = (q - 8)·scale + zero;
- ``int8`` activations: asymmetric per token (one scale and zero point per row of the last dimension);
  scale = (max(x⁺) - min(x⁻)) / 255 over the row's range widened to include 0,
  zero = -128 - round(min / scale), q = clamp(round(x / scale) + zero, -128, 127);
- ``mxfp4`` (OCP microscaling): FP4 E2M1 values, one power-of-two (E8M0) scale per 32 elements,
  2^ceil(log2(amax / 6)) (torchao's RCEIL mode), so no element exceeds ±6;
- ``nvfp4``: FP4 E2M1 values, one FP8 E4M3 scale per 16 elements on top of one float32 scale per
  tensor: tensor scale = amax / (448·6), block scale = e4m3(block amax / 6 / tensor scale) clamped to
  [2^-6, 448], x / (block scale · tensor scale) clamped to ±6 then rounded to FP4.

All arithmetic is float32; rounding is to nearest, ties to even (as ``torch.round`` and the FP4 cast).
Gradient (straight-through estimator): for int4 weights, rounding passes the gradient and autograd
takes the rest, the group's min and max included, as torchao's int4 weight fake quantizer does (each
group's max and min element also get the rounding residuals' share through the scale); for int8
activations (scales treated as constants) the identity for every element whose rounded value lies on the
grid and zero for the few clamped onto its edge (as torchao's clamp gives); for mxfp4 and nvfp4 the
identity everywhere (torchao's MX and NVFP4 QAT take the gradient through the dequantized values, the
saturated block maxima included).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the non-negative FP4 E2M1 values
FP4_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = 2.0 ** -6  # the smallest normal FP8 E4M3 value: the least nvfp4 block scale
BLOCK = {"mxfp4": 32, "nvfp4": 16}
TINY = torch.finfo(torch.float32).smallest_normal
INT4_EPS = 1e-6  # the least int4 group range (torchao's)


def _over(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device (CUDA turns a division by a Python scalar into a
    multiplication by its rounded reciprocal, one bit off at times: a scale one bit off moves an element
    sitting on a rounding tie, such as int4's -7.5 steps, to the other side)."""
    return t / torch.full_like(t, divisor)


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` in float32 as (..., n_groups, size) along its last dimension."""
    if x.shape[-1] % size:
        raise ValueError(f"fake quantization: the last dimension {x.shape[-1]} is not a multiple of the "
                         f"group size {size}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // size, size)


@functools.lru_cache(maxsize=None)
def _fp4_grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP4's non-negative values, the midpoints between them) on ``device``, made once per device."""
    grid = torch.tensor(FP4_GRID, device=device)
    return grid, (grid[1:] + grid[:-1]) / 2


def round_fp4(v: torch.Tensor) -> torch.Tensor:
    """``v`` (float32) rounded to the nearest FP4 E2M1 value, ties to the even mantissa, saturating at ±6."""
    grid, mids = _fp4_grid(v.device)
    mag = v.abs()
    below = torch.bucketize(mag, mids, right=False)  # a tie lands on the lower neighbour
    above = torch.bucketize(mag, mids, right=True)  # a tie lands on the upper neighbour
    # ties: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4: the lower one for an even midpoint index
    index = torch.where(below % 2 == 0, below, above)
    return torch.copysign(grid[index], v)


def int4_weight(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fake-quantized ``w`` (float32, differentiable): asymmetric min-max int4 per group of ``group_size``
    inputs, rounding straight-through."""
    g = _groups(w, group_size)
    low = g.amin(-1, keepdim=True)
    scale = _over((g.amax(-1, keepdim=True) - low).clamp(min=INT4_EPS), 15)
    steps = (g - low) / scale
    q = (steps + (torch.round(steps) - steps).detach()).clamp(0, 15)
    return ((q - 8) * scale + (low + scale * 8)).reshape(w.shape)


def int8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized ``x``, on-grid mask): asymmetric int8 per token (row of the last dimension)."""
    f = x.float()
    low = f.amin(-1, keepdim=True).clamp(max=0)
    high = f.amax(-1, keepdim=True).clamp(min=0)
    scale = _over(high - low, 255).clamp(min=TINY)
    zero = (-128 - torch.round(low / scale)).clamp(-128, 127)
    q = torch.round(f / scale) + zero
    return (q.clamp(-128, 127) - zero) * scale, (q >= -128) & (q <= 127)


def mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """(fake-quantized ``x``, None: every gradient passes): MXFP4, FP4 values with a power-of-two scale per 32."""
    g = _groups(x, BLOCK["mxfp4"])
    descale = _over(g.abs().amax(-1, keepdim=True), FP4_MAX)
    mantissa, exponent = torch.frexp(descale)  # descale = mantissa · 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent)
    ceil_log2 = torch.where(descale > 0, ceil_log2, torch.full_like(ceil_log2, -127)).clamp(-127, 127)
    scaled = torch.ldexp(g, -ceil_log2)  # exact: a power of two
    return torch.ldexp(round_fp4(scaled), ceil_log2).reshape(x.shape), None


def nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """(fake-quantized ``x``, None: every gradient passes): NVFP4, FP4 values with an E4M3 scale per 16 and
    one float32 scale per tensor."""
    g = _groups(x, BLOCK["nvfp4"])
    amax = g.abs().amax()
    tensor_scale = torch.where(amax > 0, _over(amax, E4M3_MAX * FP4_MAX), torch.ones_like(amax))
    block = (_over(g.abs().amax(-1, keepdim=True), FP4_MAX) / tensor_scale).clamp(E4M3_TINY, E4M3_MAX)
    block = block.to(torch.float8_e4m3fn).float()
    scaled = g * ((1.0 / tensor_scale) / block)
    out = round_fp4(scaled) * (block * tensor_scale)  # round_fp4 saturates at ±6
    return out.reshape(x.shape), None


class StraightThrough(torch.autograd.Function):
    """Forward: ``quantize(x)`` in ``x``'s dtype; backward: the gradient where the value was on the grid
    (everywhere when ``quantize`` gives no mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]):
        out, on_grid = quantize(x.detach())
        ctx.masked = on_grid is not None
        if ctx.masked:
            ctx.save_for_backward(on_grid)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.masked:
            return grad, None
        (on_grid,) = ctx.saved_tensors
        return grad * on_grid, None


def quantizer(dtype: str, group_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fake quantizer of ``dtype`` (int4 weights per ``group_size``, int8 per token, mxfp4, nvfp4),
    with its straight-through gradient."""
    if dtype == "int4":
        return lambda t: int4_weight(t, group_size or 32).to(t.dtype)
    plain = {"int8": int8_token, "mxfp4": mxfp4, "nvfp4": nvfp4}[dtype]
    return lambda t: StraightThrough.apply(t, plain)
