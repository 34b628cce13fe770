"""A collated batch → a model's inputs, and the token-summed loss that gradient accumulation needs.

The 4-D additive attention mask is causal *within* each sample and closed between samples and
over padding, so a packed row trains exactly like its samples would alone. Models whose config
names sliding-window layers (``layer_types``: Gemma 2/3, gpt-oss) get one mask per layer type, the
sliding one also closed beyond ``sliding_window`` tokens back, as transformers masks them: a 4-D mask
given alone would reach those layers unwindowed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunedag.data.formats import IGNORE_INDEX


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where query i may see key j (same sample, j <= i, and with
    ``window`` i - j < window), else min."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    allowed = same & causal & (segment_ids[:, None, :] > 0)
    # padding queries see themselves only, so their softmax stays finite (their loss is ignored)
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(config: Any) -> int | None:
    """The window of a config whose ``layer_types`` include sliding-window layers, else None."""
    if config is None or "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return None
    return getattr(config, "sliding_window", None)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 config: Any = None) -> dict:
    """The model's keyword inputs; ``config`` (the model's) decides whether sliding layers get their own mask."""
    segments = batch["segment_ids"].to(device)
    mask = packed_attention_mask(segments, dtype)
    window = sliding_window(config)
    if window is not None:
        mask = {"full_attention": mask, "sliding_attention": packed_attention_mask(segments, dtype, window)}
    return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
            "attention_mask": mask}


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained tokens (the caller divides by the group's count)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
