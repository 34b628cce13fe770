"""AdamW on bf16 weights that keeps updates smaller than a bf16 step (``master_weights: bf16_kahan``).

A bf16 weight near 0.02 has neighbours 1.2e-4 apart, while an AdamW step at lr 1e-5 moves it by about
1e-5: written straight into bf16 the step rounds away, every step, and the weight never moves (the
"bf16" row of BENCHMARKS.md's full fine-tuning precision study). An fp32 master copy fixes that at 4
more bytes per weight (16 in all with fp32 moments). Kahan summation fixes it at 2: each weight keeps a
bf16 compensation ``c``, the part of the intended weight that the last rounding dropped. One step:

    target = adamw(w) + c          # fp32: the AdamW update of the bf16 weight, plus what was lost
    w      = bf16(target)          # the stored weight
    c      = bf16(target - w)      # what this rounding lost, added back next step

``w + c`` follows the fp32 trajectory to within ``c``'s own rounding (2^-9 of a residual already below
half a bf16 step), so small steps add up until they move ``w``. The AdamW arithmetic and the moment
storage are those of :func:`tunedag.train.quantized_adamw.adamw_targets`: fp32 moments (``bits=None``) or
block-wise 8- or 4-bit ones. State per trained bf16 weight: compensation 2 bytes + moments (8 fp32,
2.03 8-bit, 1.06 4-bit); with the bf16 weight and gradient, 8.03 bytes per parameter under
``adamw_torch_8bit``. An fp32 weight has nothing to compensate and is updated as by AdamW.

Elementwise on this rank's shard, so FSDP2's DTensor weights work as plain ones (the compensation is a
DTensor sharded as its weight), and the compensation is optimizer state: saved and loaded with the
moments, so a resumed run continues bit for bit.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from tunedag.train.quantized_adamw import (BLOCK_SIZE, StateKeepingOptimizer, adamw_step, adamw_targets, as_rows,
                                           local)

COMPENSATION = "compensation"  # the state key of a weight's Kahan compensation


@torch.no_grad()
def kahan_adamw_step(param: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
    """One AdamW update of ``param`` (this rank's shard), rounded to its dtype with Kahan compensation."""
    weight = as_rows(local(param))
    if weight.dtype == torch.float32:
        adamw_step(param, state, group)
        return
    if COMPENSATION not in state:
        state[COMPENSATION] = torch.zeros_like(param, memory_format=torch.preserve_format)
    compensation = as_rows(local(state[COMPENSATION]))
    for rows, target in adamw_targets(param, state, group):
        target.add_(compensation[rows])
        weight[rows].copy_(target)
        compensation[rows].copy_(target.sub_(weight[rows]))


class KahanAdamW(StateKeepingOptimizer):
    """``torch.optim.AdamW``'s update on low-precision weights with a Kahan compensation per weight, and
    fp32 (``bits=None``), 8-bit or 4-bit moments (see the module's doc)."""

    def __init__(self, params: Iterable[Any], lr: float, bits: int | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if bits is not None and bits not in BLOCK_SIZE:
            raise ValueError(f"KahanAdamW: bits must be 8, 4 or None (fp32 moments), got {bits!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits,
                                      block_size=BLOCK_SIZE.get(bits, 0)))

    def update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        kahan_adamw_step(param, state, group)
