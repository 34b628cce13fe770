"""Reward modelling's objective (``rl: reward``): a Bradley-Terry loss on preference pairs.

The model is the decoder under a scalar head (:mod:`tunedag.models.reward_head`); every segment
of a packed ``type: dpo`` row gets its own reward.

Loss (Bradley-Terry, TRL's ``RewardTrainer``), per pair, summed; ``loss_units`` counts pairs so the
loop's "sum, then divide by the group's count" is TRL's mean over pairs::

    -logσ(r_chosen - r_rejected) + c·(r_chosen + r_rejected)²

with c = ``center_rewards_coefficient`` (0: off), which keeps rewards centred on zero.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tunedag.config import RunConfig
from tunedag.data.batches import pair_indices
from tunedag.models.reward_head import segment_rewards


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor,
                         center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss: -logσ(r_c - r_r), plus c·(r_c + r_r)² when centring."""
    losses = -F.logsigmoid(chosen - rejected)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


@dataclass
class RewardObjective:
    """``rl: reward``'s loss over a packed batch of pairs, for an engine's ``loss_sum``."""

    run: RunConfig

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: the loss is averaged over them."""
        return int((batch["segment_labels"] >= 0).sum()) // 2

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        with autocast():
            rewards, labels = segment_rewards(model, batch, device)
        c, r = pair_indices(labels)
        return bradley_terry_losses(rewards[c], rewards[r], self.run.center_rewards_coefficient).sum()
