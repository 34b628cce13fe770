"""Process reward modelling's objective (``rl: prm``): cross entropy of each step's label.

The model is the decoder under a 2-label token head (:mod:`tunedag.models.prm_head`); a
``type: stepwise_supervised`` sample labels the last token of each step 0 (wrong) or 1 (right).
The loss is summed over the labelled tokens and ``loss_units`` counts them, so the loop's "sum, then
divide by the group's count" is the mean over a step's labelled tokens: what transformers'
token-classification loss (Axolotl's and TRL's PRMTrainer) computes for one batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tunedag.data.formats import IGNORE_INDEX
from tunedag.models.prm_head import step_logits


@dataclass
class PRMObjective:
    """``rl: prm``'s loss over a packed batch, for an engine's ``loss_sum``."""

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled tokens: the loss is averaged over them."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        with autocast():
            logits, labels = step_logits(model, batch, device)
        return F.cross_entropy(logits, labels, reduction="sum")
