"""Training engines: how a model is prepared and how one micro-batch's loss is computed.

The loop (tunedag.train.loop) is the same for every engine. ``torch`` is plain HF transformers
+ PEFT: the reference every faster engine is compared to, and the engine on CPU. ``triton``
(tunedag.train.triton_engine) runs the decoder on tunedag's kernels on one GPU; ``make_engine``
picks it for ``train_engine: auto`` when exactly one CUDA GPU is present, and falls back to
``torch`` with a log line naming the reason for anything the fast path does not cover (of the
``rl`` objectives, reward modelling trains on the torch engine; dpo, orpo and kto on either).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from tunedag.config import RunConfig
from tunedag.models.loading import load_causal_lm
from tunedag.models.qlora import fake_quantize_
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.train.preference import PreferenceObjective
from tunedag.models.reward_head import load_reward_model
from tunedag.train.reward import RewardObjective

log = logging.getLogger(__name__)


class TorchEngine:
    """HF model + PEFT LoRA; fp32 weights, bf16 autocast on CUDA."""

    name = "torch"

    def __init__(self, run: RunConfig, model_path: Path, device: torch.device):
        self.device = device
        reward = run.rl == "reward"
        if reward:  # the decoder under a scalar head (tunedag.train.reward)
            base = load_reward_model(model_path, torch.float32, run.trust_remote_code, run.seed)
        else:
            base = load_causal_lm(model_path, torch.float32, run.trust_remote_code)
        if run.adapter == "qlora":
            n = fake_quantize_(base)
            log.info("torch engine, qlora: %d projections hold their NF4-dequantised values "
                     "(the numerics of a 4-bit base, not its memory saving)", n)
        if run.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                          target_modules=list(run.lora_target_modules), bias="none",
                          task_type="SEQ_CLS" if reward else "CAUSAL_LM",  # SEQ_CLS trains `score` in full
                          modules_to_save=list(run.lora_modules_to_save) or None)
        self.model = get_peft_model(base, lora).to(device)
        self.model.train()
        self.objective = RewardObjective(run) if reward else PreferenceObjective(run) if run.rl else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch (packed samples never see each other); with ``rl``,
        the summed preference loss of its pairs or samples (tunedag.train.preference), or with
        ``rl: reward`` the reward model's (tunedag.train.reward)."""
        if self.objective is not None:
            return self.objective.loss_sum(self.model, batch, self.device, self.autocast)
        with self.autocast():
            logits = self.model(**model_inputs(batch, self.device, torch.float32)).logits
        return loss_sum(logits, batch["labels"])

    def load_trainable(self, checkpoint: Path) -> None:
        set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors"))

    def save(self, dest: Path) -> None:
        self.model.save_pretrained(dest, safe_serialization=True)


def triton_blocker(run: RunConfig, model_path: Path, device: torch.device) -> str | None:
    """Why the triton engine cannot train ``run`` here (None: it can)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU (the Triton kernels run on the CPU only under TRITON_INTERPRET=1)"
    from transformers import AutoConfig

    from tunedag.models.registry import fast_path_blocker

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=run.trust_remote_code)
    return fast_path_blocker(config, rl=run.rl, lora_dropout=run.lora_dropout,
                             lora_target_modules=run.lora_target_modules,
                             lora_modules_to_save=run.lora_modules_to_save)


def make_engine(run: RunConfig, model_path: Path):
    """Pick the engine for ``run`` on this machine: a TritonEngine or a TorchEngine."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device("cuda" if n_gpus else "cpu")
    if run.train_engine == "triton" or (run.train_engine == "auto" and n_gpus == 1):
        reason = triton_blocker(run, model_path, device)
        if reason is None:
            from tunedag.train.triton_engine import TritonEngine

            return TritonEngine(run, model_path, device)
        log.info("train_engine %s: using the torch engine because %s", run.train_engine, reason)
    elif run.train_engine == "auto":
        log.info("train_engine auto: using the torch engine (%d CUDA GPUs; triton needs exactly one)", n_gpus)
    return TorchEngine(run, model_path, device)
