"""The batch contract between the packed shards and every model pass: rows → padded tensors.

A batch holds ``input_ids``, ``labels`` and ``position_ids`` (B, T) and ``segment_ids`` (B, T),
which number a row's samples from 1 (0 = padding); preference rows add ``segment_labels``
(B, most segments in a row), -1 padded. A dpo row holds its pairs as adjacent segments, chosen
(label 1) then rejected (label 0); a kto row holds single samples, desirable (1) or not (0).
"""
from __future__ import annotations

import numpy as np
import torch

from tunedag.data.formats import IGNORE_INDEX
from tunedag.errors import TunedagError


class PreferenceDataError(TunedagError, ValueError):
    """A preference pair or sample the objective cannot learn from; names the shard and row."""


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


def trained_token_count(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss once labels are shifted by one."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def segment_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) global segment number of every position (-1 on padding), and the segment labels (S,)."""
    seg = batch["segment_ids"]  # (B, T), 1.. per row, 0 = padding
    per_row = seg.max(dim=1).values  # (B,)
    offsets = torch.cumsum(per_row, 0) - per_row
    index = torch.where(seg > 0, seg - 1 + offsets[:, None], torch.full_like(seg, -1))
    labels = batch["segment_labels"]  # (B, max segments), -1 padded
    seg_labels = torch.cat([labels[b, :int(per_row[b])] for b in range(labels.shape[0])])
    return index, seg_labels


def pair_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the chosen and rejected segments; checks the segment labels read 1, 0, 1, 0, …"""
    expected = torch.arange(labels.shape[0], device=labels.device) % 2 == 0
    if labels.shape[0] % 2 or not torch.equal(labels.bool(), expected):
        raise PreferenceDataError("dpo batch: segment labels do not read chosen, rejected, … in pairs "
                                  "(were the shards made from type: dpo data?)")
    idx = torch.arange(0, labels.shape[0], 2, device=labels.device)
    return idx, idx + 1
