"""The process reward model: a 2-label token head on the decoder, and its logits at the labelled steps.

The model is the base decoder as transformers' ``<Arch>ForTokenClassification`` with ``num_labels=2``
(Axolotl's ``process_reward_model`` with ``AutoModelForTokenClassification``): the causal LM head is
dropped, ``dropout`` then ``score`` (Linear(hidden, 2) with a bias) read every token's final hidden
state. Only the tokens that carry a step label (``type: stepwise_supervised``: the last token of each
step) go through the head here, which is the token classifier's output at those positions: the
dropout is elementwise, so picking rows before it changes nothing. The head starts as N(0,
initializer_range) weights from the run's seed and a zero bias (tunedag.models.reward_head), so the
evaluate stage can rebuild the untrained model. LoRA adapts the decoder; peft's TOKEN_CLS task trains
``score`` in full and saves it with the adapter.

Packed rows: the labels are classes, not next tokens, so nothing is shifted and no label reaches
across a sample; the packed attention mask keeps each sample's tokens to themselves.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, PreTrainedModel

from tunedag.data.formats import IGNORE_INDEX
from tunedag.models.reward_head import classifier_hidden, load_classifier

PRM_LABELS = 2  # a step is wrong (0) or right (1)


def load_prm_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool, seed: int) -> PreTrainedModel:
    """The base decoder as ``<Arch>ForTokenClassification`` (two labels) with a head seeded by ``seed``."""
    return load_classifier(path, AutoModelForTokenClassification, PRM_LABELS, dtype, trust_remote_code, seed)


def step_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 2) float32, labels (N,)) of the N labelled tokens of a packed batch, in one forward pass."""
    classifier, hidden = classifier_hidden(model, batch, device)
    labels = batch["labels"].reshape(-1)
    where = torch.nonzero(labels != IGNORE_INDEX)[:, 0]  # (N,)
    picked = hidden[where.to(device)]  # (N, H)
    return classifier.score(classifier.dropout(picked)).float(), labels[where].to(device)
