"""A process reward model's scores on the validation rows: how often it calls each step right.

Every labelled token of the ``type: stepwise_supervised`` validation shards (the last token of a step)
is one step; the model's class there (argmax of its two logits) is compared with the label.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tunedag.data.batches import collate
from tunedag.data.shards import ShardReader
from tunedag.models.prm_head import step_logits


@torch.no_grad()
def step_metrics(model: torch.nn.Module, val_dir: Path, pad_id: int, rows_per_batch: int = 8) -> dict[str, float]:
    """``steps``: labelled steps; ``accuracy``: share classified right; ``loss``: mean cross entropy;
    ``accuracy_right_steps`` / ``accuracy_wrong_steps``: the same among steps labelled 1 / 0 (a model that
    calls every step right scores the share of right steps on ``accuracy`` alone)."""
    reader = ShardReader(val_dir)
    order = reader.epoch_order(0, seed=0, shuffle=False)
    logits, labels = [torch.zeros(0, 2)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(order), rows_per_batch):
        batch = collate([reader.row(i) for i in order[start:start + rows_per_batch]], pad_id)
        step, label = step_logits(model, batch, model.device)
        logits.append(step.cpu())
        labels.append(label.cpu())
    logits, labels = torch.cat(logits), torch.cat(labels)
    if labels.numel() == 0:
        return {"steps": 0}
    right = logits.argmax(-1) == labels
    out = {"steps": int(labels.numel()), "accuracy": float(right.float().mean()),
           "loss": float(F.cross_entropy(logits, labels))}
    for name, value in (("accuracy_right_steps", 1), ("accuracy_wrong_steps", 0)):
        if bool((labels == value).any()):
            out[name] = float(right[labels == value].float().mean())
    return out
