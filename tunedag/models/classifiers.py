"""The heads tunedag trains in place of the LM head, one per objective: ``rl`` → peft task → transformers class.

``rl: reward`` scores a sequence (one label, read at its last token); ``rl: prm`` classifies tokens
(two labels, read at the last token of each step). Merge, evaluate and export read this table to
rebuild, check and describe either model alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, PreTrainedModel

from tunedag.models.prm_head import PRM_LABELS, load_prm_model
from tunedag.models.reward_head import classifier_shapes, load_reward_model


@dataclass(frozen=True)
class Classifier:
    task_type: str  # peft's task: its adapters save the head in full
    auto: type  # the transformers Auto class of the merged model
    num_labels: int
    load: Callable[[str | Path, torch.dtype, bool, int], PreTrainedModel]  # (path, dtype, trust_remote_code, seed)

    def shapes(self, path: str | Path, trust_remote_code: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
        """(class name, state-dict name → shape) of the base at ``path`` under this head (meta device)."""
        return classifier_shapes(path, self.auto, self.num_labels, trust_remote_code)


BY_RL = {"reward": Classifier("SEQ_CLS", AutoModelForSequenceClassification, 1, load_reward_model),
         "prm": Classifier("TOKEN_CLS", AutoModelForTokenClassification, PRM_LABELS, load_prm_model)}
BY_TASK = {c.task_type: c for c in BY_RL.values()}
