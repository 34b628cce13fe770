"""Packed rows → model inputs, and the token-summed loss that gradient accumulation needs.

A batch carries a 4-D additive attention mask that is causal *within* each sample and closed
between samples and over padding, so a packed row trains exactly like its samples would alone.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tunedag.data.formats import IGNORE_INDEX


def collate(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; ``segment_ids`` numbers samples from 1 (0 = padding); preference rows
    also carry their ``segment_labels``."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "segment_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][b, :n] = torch.from_numpy(row["input_ids"].astype(np.int64))
        batch["labels"][b, :n] = torch.from_numpy(row["labels"].astype(np.int64))
        batch["position_ids"][b, :n] = torch.from_numpy(row["position_ids"].astype(np.int64))
        lengths = np.diff(row["cu_seqlens"])
        batch["segment_ids"][b, :n] = torch.from_numpy(np.repeat(np.arange(1, len(lengths) + 1), lengths))
    if "segment_labels" in rows[0]:  # preference shards: (B, most segments in a row), -1 padded
        most = max(len(r["segment_labels"]) for r in rows)
        batch["segment_labels"] = torch.full((len(rows), most), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            batch["segment_labels"][b, :len(row["segment_labels"])] = torch.from_numpy(
                row["segment_labels"].astype(np.int64))
    return batch


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where query i may see key j (same sample, j <= i), else min."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, None, :] > 0)
    # padding queries see themselves only, so their softmax stays finite (their loss is ignored)
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "attention_mask": packed_attention_mask(batch["segment_ids"].to(device), dtype),
    }


def trained_token_count(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss once labels are shifted by one."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained tokens (the caller divides by the group's count)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
