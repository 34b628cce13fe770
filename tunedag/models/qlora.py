"""QLoRA base weights: the seven LoRA-adapted projections of every layer in 4-bit NF4.

Storage is bitsandbytes' NF4 with double-quantised absmax (``kernels/nf4.py`` explains why that
layout rather than torchao's: plain uint8/fp32 tensors that a pure-torch reference quantises
and dequantises on the CPU in tests, that one Triton launch dequantises inside the fused LoRA
kernels on CUDA, and that a bitsandbytes-quantised checkpoint maps onto without re-quantising).
Weights are quantised from their bf16 values (what transformers' 4-bit loader quantises), so
the triton engine (fp32 on the CPU, bf16 on CUDA) and the torch engine's reference hold
byte-identical NF4 data.

Embeddings, norms and the lm_head stay in the compute dtype, as in bitsandbytes QLoRA.
"""
from __future__ import annotations

import torch
from torch import nn

from tunedag.kernels.nf4 import NF4Weight, dequantize_nf4_reference, quantize_nf4_reference
from tunedag.models.registry import QUANTIZED_PROJECTIONS


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Decoder-layer projections named in QUANTIZED_PROJECTIONS (peft's base_layer when wrapped)."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in QUANTIZED_PROJECTIONS and ".layers." in f".{name}":
            found[name] = getattr(module, "base_layer", module)
    return found


def quantize_weight(weight: torch.Tensor) -> NF4Weight:
    return quantize_nf4_reference(weight.detach().to(torch.bfloat16))


def quantize_base_weights(model: nn.Module) -> dict[str, NF4Weight]:
    """Quantise every projection's weight to NF4 and free the dense copy.

    Returns {module name: NF4Weight}; the Linear keeps an empty placeholder weight, so it can
    no longer run on its own: the fused modules read the NF4 weight instead.
    """
    quantized = {}
    for name, linear in quantizable_linears(model).items():
        quantized[name] = quantize_weight(linear.weight)
        linear.weight = nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
    return quantized


@torch.no_grad()
def fake_quantize_(model: nn.Module) -> int:
    """Replace each projection's weight by its NF4 round trip (the torch engine's QLoRA reference)."""
    linears = quantizable_linears(model)
    for linear in linears.values():
        w = linear.weight
        w.copy_(dequantize_nf4_reference(quantize_weight(w), torch.float32).to(w.dtype))
    return len(linears)
