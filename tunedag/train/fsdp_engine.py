"""``train_engine: fsdp``: the torch engine's model under FSDP2 ``fully_shard``, every decoder layer
then the root (frozen base + LoRA in one unit).

FSDP averages gradients over ranks; the loss is scaled by the world size so the reduced gradient
is the sum the loop's token mean needs (exact for a power-of-two world size). Checkpoints hold
the full (gathered) adapter weights and a full optimizer state keyed by parameter name, so they
do not depend on the number of ranks: a job resumes on another rank count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tunedag.config import RunConfig
from tunedag.io import atomic_path
from tunedag.train.engines import OPTIMIZER_FILE, TorchEngine, adamw
from tunedag.train.ranks import DistEnv


def peft_key(name: str, adapter: str = "default") -> str:
    """The key PEFT saves a model parameter under: ``...q_proj.lora_A.default.weight`` →
    ``...q_proj.lora_A.weight``, ``...lm_head.modules_to_save.default.weight`` → ``...lm_head.weight``."""
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


class FSDPEngine:
    """See the module docstring; the loop's engine protocol is in :mod:`tunedag.train.engines`."""

    name = "fsdp"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv, device: torch.device):
        from torch.distributed.fsdp import fully_shard

        self.env = env
        self.inner = TorchEngine(run, model_path, device)
        self.model, self.device, self.objective = self.inner.model, device, self.inner.objective
        for layer in self.model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(self.model)
        self.params = self.inner.trainable_parameters()
        self.optimizer = adamw(self.params, run, fused=False)  # over DTensor shards
        self.info: dict[str, Any] = {"model_engine": "torch"}
        self.run_files: dict[str, Any] = {}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.loss_sum(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.env.world_size).backward()  # reduce-scatter in backward averages

    def step(self, max_norm: float | None) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _options(self, **kw: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def _gathered_weights(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model, options=self._options(ignore_frozen_params=True))

    def write_payload(self, folder: Path) -> None:
        """Collective: the full adapter and optimizer state, gathered; rank 0 writes them."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        weights = self._gathered_weights()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if self.env.is_main:
            self.model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
            torch.save(optim, folder / OPTIMIZER_FILE)

    def load_payload(self, checkpoint: Path) -> None:
        """Every rank reads the full state and keeps its shard of it."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        saved = load_file(checkpoint / "adapter_model.safetensors")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        set_model_state_dict(self.model, {n: saved[peft_key(n)] for n in names},
                             options=self._options(strict=False))
        optim = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=self._options())

    def save_adapter(self, dest: Path) -> None:
        weights = self._gathered_weights()
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
