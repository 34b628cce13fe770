"""Quantization-aware training (``qat:``): every ``nn.Linear`` of the model, the decoder's projections and
``lm_head`` alike (torchao's ``quantize_`` takes every linear layer, and Axolotl calls it on the whole
model), computes with fake-quantized weights and activations, so that training learns weights that
survive the quantization they will be served with (:mod:`tunedag.models.fake_quant` holds the grids).

:class:`QATLinear` is an ``nn.Linear`` holding the same ``weight`` and ``bias`` parameters, so names,
checkpoints, FSDP sharding and the saved model are those of the plain model: what training writes is
the full-precision weights, as Axolotl's convert step leaves them. ``fake_quant_after_n_steps``: the
layers compute as plain linears until that many optimizer steps are done (:func:`set_fake_quant`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunedag.errors import TunedagError
from tunedag.models.fake_quant import BLOCK, quantizer


class QATError(TunedagError, ValueError):
    """A model whose linear layers cannot take the requested fake quantization."""


class QATLinear(torch.nn.Linear):
    """``nn.Linear`` computing ``linear(fq_a(x), fq_w(weight), bias)`` while ``fake_quant`` is on."""

    def __init__(self, linear: torch.nn.Linear, weight_dtype: str, activation_dtype: str | None,
                 group_size: int | None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: nothing is copied
        self.weight_dtype, self.activation_dtype, self.group_size = weight_dtype, activation_dtype, group_size
        self.weight_fq = quantizer(weight_dtype, group_size)
        self.activation_fq = quantizer(activation_dtype) if activation_dtype else None
        self.fake_quant = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant:
            return F.linear(x, self.weight, self.bias)
        if self.activation_fq is not None:
            x = self.activation_fq(x)
        return F.linear(x, self.weight_fq(self.weight), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.weight_dtype}, activation={self.activation_dtype}, "
                f"group_size={self.group_size}, fake_quant={self.fake_quant}")


def block_of(dtype: str, group_size: int | None) -> int:
    """The number of inputs one scale covers for weights of ``dtype``."""
    return BLOCK.get(dtype) or group_size or 32


def prepare_qat(model: torch.nn.Module, weight_dtype: str, activation_dtype: str | None,
                group_size: int | None) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`QATLinear` in place; the number swapped.
    Works on the meta device too (FSDP builds the model there). A layer whose input size is not a multiple
    of the block stops the run, naming it."""
    block = max(block_of(weight_dtype, group_size), BLOCK.get(activation_dtype or "", 1))
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    uneven = [f"{name} ({m.in_features} inputs)" for name, m in linears if m.in_features % block]
    if uneven:
        raise QATError(f"qat: {weight_dtype} weights / {activation_dtype} activations quantize blocks of "
                       f"{block} inputs; these layers' input size is not a multiple of it: "
                       f"{', '.join(uneven[:4])}; choose a group_size that divides it")
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QATLinear(linear, weight_dtype, activation_dtype, group_size))
    return len(linears)


def set_fake_quant(model: torch.nn.Module, on: bool) -> None:
    """Turn fake quantization on or off in every :class:`QATLinear` of ``model``."""
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.fake_quant = on


def fake_quant_due(step: int, after_n_steps: int | None) -> bool:
    """Whether the optimizer step after ``step`` completed ones trains with fake quantization
    (Axolotl's QAT callback: off from step 0, on once ``fake_quant_after_n_steps`` steps are done)."""
    return after_n_steps is None or step >= after_n_steps
