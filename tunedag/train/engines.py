"""Training engines: how a model is prepared and how one micro-batch's loss is computed.

The loop (tunedag.train.loop) is the same for every engine. ``torch`` is plain HF transformers
+ PEFT: the reference every faster engine is compared to, and the engine on CPU.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from tunedag.config import RunConfig
from tunedag.models.loading import load_causal_lm
from tunedag.train.batching import loss_sum, model_inputs

log = logging.getLogger(__name__)


class TorchEngine:
    """HF model + PEFT LoRA; fp32 weights, bf16 autocast on CUDA."""

    name = "torch"

    def __init__(self, run: RunConfig, model_path: Path, device: torch.device):
        self.device = device
        base = load_causal_lm(model_path, torch.float32, run.trust_remote_code)
        if run.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                          target_modules=list(run.lora_target_modules), bias="none", task_type="CAUSAL_LM",
                          modules_to_save=list(run.lora_modules_to_save) or None)
        self.model = get_peft_model(base, lora).to(device)
        self.model.train()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch (packed samples never see each other)."""
        with self.autocast():
            logits = self.model(**model_inputs(batch, self.device, torch.float32)).logits
        return loss_sum(logits, batch["labels"])

    def load_trainable(self, checkpoint: Path) -> None:
        set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors"))

    def save(self, dest: Path) -> None:
        self.model.save_pretrained(dest, safe_serialization=True)


def make_engine(run: RunConfig, model_path: Path) -> TorchEngine:
    """Pick the engine for ``run`` on this machine."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if run.train_engine == "auto" and device.type == "cuda":
        log.info("train_engine auto: the triton engine is not available in this build; using torch")
    return TorchEngine(run, model_path, device)
