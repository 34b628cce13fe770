"""Sparse fine-tuning: a pruned base model (e.g. 2:4 sparse) stays sparse while every weight trains.

``keep_sparsity`` names parameters by regular expression (``re.search``). Each matching trained
parameter keeps a mask of the entries that are non-zero in the base model; before every optimizer step
their gradients, and after it their values, are multiplied by it. A pruned entry therefore stays exactly
zero whatever the optimizer (weight decay, Adam's state, 8-bit states), and gradient clipping sees only
the entries that train, as llm-compressor's ConstantPruningModifier does for Axolotl.

The masks are taken when the engine has loaded the base model, before a checkpoint is resumed, so a
resumed run keeps the base's sparsity pattern. They work on plain tensors and on FSDP2's sharded
DTensor parameters alike (each rank masks its shard).
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

import torch

from tunedag.errors import TunedagError

log = logging.getLogger(__name__)


class SparsityError(TunedagError, ValueError):
    """``keep_sparsity`` matches nothing the run trains."""


class KeptSparsity:
    """The masks of the trained parameters ``patterns`` match (none: nothing to do)."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], patterns: Sequence[str]):
        self.masked: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if not patterns:
            return
        names = []
        for name, param in named_parameters:
            if param.requires_grad and any(re.search(p, name) for p in patterns):
                self.masked.append((param, param.detach() != 0))
                names.append(name)
        if not self.masked:
            raise SparsityError(f"keep_sparsity {list(patterns)} matches no trained parameter of this model")
        local = [m.to_local() if hasattr(m, "to_local") else m for _, m in self.masked]  # FSDP2: this shard's
        kept, total = sum(int(m.sum()) for m in local), sum(m.numel() for m in local)
        log.info("keep_sparsity: %d tensors, %.1f%% of their entries (on this rank) are zero and stay zero",
                 len(names), 100.0 * (1 - kept / max(total, 1)))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for param, mask in self.masked:
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def mask_weights(self) -> None:
        for param, mask in self.masked:
            param.mul_(mask)
