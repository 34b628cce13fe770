"""Scores of the validation pairs and samples: log-probs and rewards per segment, and their metrics.

Every segment of the packed validation shards is scored in shard order (``segment_scores``):
by its response log-prob under a causal LM (dpo, orpo, kto) or by a reward model's reward
(``rl: reward``); the metrics compare chosen with rejected, or desirable with undesirable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from tunedag.data.batches import collate, pair_indices
from tunedag.data.shards import ShardReader
from tunedag.models.logprobs import sequence_logps
from tunedag.models.reward_head import segment_rewards


@torch.no_grad()
def segment_scores(val_dir: Path, pad_id: int,
                   score: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
                   rows_per_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (S,), labels (S,)) of every segment in ``val_dir``, in shard order, on the CPU.

    ``score`` maps a collated batch to its per-segment scores and labels (log-probs, rewards).
    """
    reader = ShardReader(val_dir)
    order = reader.epoch_order(0, seed=0, shuffle=False)
    scores, labels = [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(order), rows_per_batch):
        values, segment_labels = score(collate([reader.row(i) for i in order[start:start + rows_per_batch]], pad_id))
        scores.append(values.float().cpu())
        labels.append(segment_labels.cpu())
    return torch.cat(scores), torch.cat(labels)


def _logps_and_labels(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    def score(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        seq = sequence_logps(model, batch, model.device)
        return seq.logps, seq.labels
    return score


def pair_logps(model: torch.nn.Module, val_dir: Path, pad_id: int) -> torch.Tensor:
    """(pairs, 2) summed response log-probs, chosen then rejected, of every dpo pair in ``val_dir``."""
    logps, labels = segment_scores(val_dir, pad_id, _logps_and_labels(model))
    c, r = pair_indices(labels)
    return torch.stack([logps[c], logps[r]], 1)


def sample_logps(model: torch.nn.Module, val_dir: Path, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (S,), labels (S,)) of every kto sample in ``val_dir``: 1 desirable, 0 undesirable."""
    return segment_scores(val_dir, pad_id, _logps_and_labels(model))


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor | None, beta: float) -> dict[str, float]:
    """Accuracy and margin of (pairs, 2) log-probs; with a reference, DPO's implicit rewards too.

    ``preference_accuracy``: share of pairs whose chosen response is the likelier one;
    ``reward_accuracy`` / ``reward_margin``: the same on β·(log π - log π_ref), the rewards DPO trains.
    """
    if policy.shape[0] == 0:
        return {"pairs": 0}
    margin = policy[:, 0] - policy[:, 1]
    out = {"pairs": int(policy.shape[0]), "preference_accuracy": float((margin > 0).float().mean()),
           "logp_margin": float(margin.mean())}
    if reference is not None:
        rewards = beta * (policy - reference)
        reward_margin = rewards[:, 0] - rewards[:, 1]
        out.update(reward_accuracy=float((reward_margin > 0).float().mean()),
                   reward_margin=float(reward_margin.mean()))
    return out


def kto_metrics(policy: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
                beta: float) -> dict[str, float]:
    """Mean log-probs of desirable and undesirable samples; with a reference, KTO's implicit rewards.

    ``reward_accuracy``: share of samples whose reward β·(log π - log π_ref) has the sign of their
    label (positive for desirable, negative for undesirable); ``reward_margin``: mean desirable
    reward minus mean undesirable reward (TRL's rewards/chosen - rewards/rejected).
    """
    good, bad = labels == 1, labels == 0
    out: dict[str, float] = {"desirable": int(good.sum()), "undesirable": int(bad.sum())}
    if not labels.numel():
        return out

    def mean(x: torch.Tensor, where: torch.Tensor) -> float:
        return float(x[where].mean()) if where.any() else float("nan")

    out.update(desirable_logp=mean(policy, good), undesirable_logp=mean(policy, bad))
    if reference is not None:
        rewards = beta * (policy - reference)
        right_sign = torch.where(good, rewards > 0, rewards < 0)  # a zero reward is wrong either way
        out.update(reward_accuracy=float(right_sign.float().mean()),
                   desirable_reward=mean(rewards, good), undesirable_reward=mean(rewards, bad),
                   reward_margin=mean(rewards, good) - mean(rewards, bad))
    return out


def pair_rewards(model: torch.nn.Module, val_dir: Path, pad_id: int) -> torch.Tensor:
    """(pairs, 2) rewards, chosen then rejected, of every dpo pair in ``val_dir``."""
    rewards, labels = segment_scores(val_dir, pad_id, lambda batch: segment_rewards(model, batch, model.device))
    c, r = pair_indices(labels)
    return torch.stack([rewards[c], rewards[r]], 1)


def reward_metrics(rewards: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (r_chosen > r_rejected), mean margin and mean rewards of (pairs, 2) rewards."""
    if rewards.shape[0] == 0:
        return {"pairs": 0}
    margin = rewards[:, 0] - rewards[:, 1]
    return {"pairs": int(rewards.shape[0]), "accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean()), "chosen_reward": float(rewards[:, 0].mean()),
            "rejected_reward": float(rewards[:, 1].mean())}
