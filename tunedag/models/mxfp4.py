"""gpt-oss's MXFP4 expert weights, dequantized for training, merging and export.

openai/gpt-oss-20b and -120b ship each layer's experts as MXFP4: ``{gate_up,down}_proj_blocks``
(E, out, in/32, 16) bytes, two FP4 (e2m1) codes per byte, low nibble first, and
``{gate_up,down}_proj_scales`` (E, out, in/32), one power-of-two exponent (biased by 127) per 32
values. LoRA trains against the dequantized weights (transformers dequantizes them when loading
with ``Mxfp4Config(dequantize=True)``); the merge reads the checkpoint tensor by tensor, so it
dequantizes each blocks/scales pair itself into the (E, in, out) parameter the model holds, the
exact values transformers computes (FP4 codes times powers of two are exact in fp32 and bf16).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

# e2m1 codes 0..15: sign bit 3, then the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def is_mxfp4(config: dict[str, Any] | None) -> bool:
    """Whether a config.json (as a dict) says the checkpoint holds MXFP4 weights."""
    return ((config or {}).get("quantization_config") or {}).get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(E, out, G, 16) uint8 blocks and (E, out, G) uint8 scales -> the (E, in = 32 G, out) weight."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype}: expected uint8 (E, out, G, 16) and (E, out, G)")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # low nibble first
    values = lut[codes].flatten(-2)  # (E, out, G, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2).transpose(1, 2).contiguous().to(dtype)


def dequantized_tensors(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with each ``X_blocks``/``X_scales`` pair replaced by ``X`` dequantized (fp32), in order."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        part = BLOCKS if name.endswith(BLOCKS) else SCALES if name.endswith(SCALES) else None
        if part is None:
            yield name, tensor
            continue
        stem = name.removesuffix(part)
        pair = pending.setdefault(stem, {})
        pair[part] = tensor
        if len(pair) == 2:
            del pending[stem]
            yield stem, dequantize(pair[BLOCKS], pair[SCALES])
    if pending:
        raise ValueError(f"MXFP4 checkpoint: {sorted(pending)[:3]} have blocks without scales or scales without blocks")
