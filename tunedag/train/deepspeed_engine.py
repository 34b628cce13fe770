"""``train_engine: deepspeed``: DeepSpeed ZeRO stage 2 or 3 under tunedag's distributed loop.

The DeepSpeed JSON is generated from config.yaml (:func:`deepspeed_config`) and written to
``{run_dir}/deepspeed_config.json``; ``deepspeed_config: path.json`` replaces the generated one
by the user's, into which tunedag writes the keys it owns (:data:`OWNED`): a user value for one
of them must equal config.yaml's (or be ``"auto"``), else the run stops naming both.

- Precision: bf16 weights with fp32 master copies in the optimizer on CUDA; fp32 on CPU.
- Optimizer: the client ``torch.optim.AdamW``; with optimizer offload DeepSpeed's
  ``DeepSpeedCPUAdam`` (same update, AVX on the CPU; its extension is compiled on first use).
  The learning-rate schedule is the loop's, on that optimizer's parameter groups.
- Gradients: ``managed_gradient_accumulation: false``, so every ``step()`` is an optimizer step
  after however many micro-batches the loop fed (an epoch's last step may hold fewer).
  ``backward(loss, scale_wrt_gas=False)`` keeps DeepSpeed from dividing by the accumulation
  steps, and the loss is multiplied by the world size because ZeRO averages gradients over
  ranks: the reduced gradient is the sum the loop's token mean needs (exact for a power-of-two
  world size). DeepSpeed clips to ``max_grad_norm`` with torch's formula.
- Checkpoints: DeepSpeed's own format (each rank writes its optimizer partition; frozen base
  weights are left out), written under ``.step-N.partial`` and renamed to ``step-N`` once
  tunedag's trainer state (schedule, RNG, data position) is in it. A checkpoint resumes on the
  same number of ranks only (ZeRO partitions depend on it).
- Final adapter: the fp32 master weights of the trainable parameters, gathered from every
  rank's partition, saved by rank 0 as a PEFT folder.

Limits: the base model is loaded whole on every rank before ZeRO-3 partitions it (no
``zero.Init``), so it must fit one device in fp32.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunedag.config import ConfigError, RunConfig
from tunedag.io import atomic_path, write_json
from tunedag.train import checkpoint as ckpt
from tunedag.train.batching import loss_sum, model_inputs
from tunedag.train.distributed import DistEnv, init_process_group
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import TrainError

log = logging.getLogger(__name__)

# DeepSpeed key -> the config.yaml key that sets it
OWNED = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "train_batch_size": "micro_batch_size x gradient_accumulation_steps x ranks",
    "gradient_clipping": "max_grad_norm",
    "managed_gradient_accumulation": "nothing: tunedag's loop decides when a step ends",
}
# sections the user JSON may not hold, and why
REFUSED = {
    "optimizer": "the optimizer is AdamW from learning_rate and weight_decay",
    "scheduler": "the schedule comes from lr_scheduler and warmup_steps",
    "fp16": "use bf16 (on by default on CUDA); fp16 loss scaling is not supported",
}


def owned_values(run: RunConfig, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed keys tunedag sets from config.yaml (train_batch_size only once ranks are known)."""
    values = {"train_micro_batch_size_per_gpu": run.micro_batch_size,
              "gradient_accumulation_steps": run.gradient_accumulation_steps,
              "gradient_clipping": run.max_grad_norm,
              "managed_gradient_accumulation": False}
    if world_size is not None:
        values["train_batch_size"] = run.micro_batch_size * run.gradient_accumulation_steps * world_size
    return values


def read_user_config(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON as a mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config file not found: {str(path)!r}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_user_config(user: dict[str, Any], run: RunConfig, world_size: int | None, source: str) -> None:
    """Refuse a user JSON that contradicts config.yaml or holds what tunedag supplies itself."""
    for key, why in REFUSED.items():
        off = key == "fp16" and isinstance(user[key] if key in user else None, dict) and not user[key].get("enabled")
        if key in user and not off:
            raise ConfigError(f"{source}: remove {key!r}: {why}")
    for key, value in owned_values(run, world_size).items():
        if key in user and user[key] != "auto" and user[key] != value:
            raise ConfigError(f"{source}: {key} is {user[key]!r} but config.yaml gives {value!r}; "
                              f"it is set from {OWNED[key]} (leave it out or write \"auto\")")
    zero = user.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 2 or 3, got {stage!r}")


def deepspeed_config(run: RunConfig, world_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for ``run`` on ``world_size`` ranks: the user's, or generated from config.yaml."""
    if run.deepspeed_config:
        config = read_user_config(run.deepspeed_config)
        check_user_config(config, run, world_size, run.deepspeed_config)
        config.setdefault("bf16", {"enabled": cuda})
        return {**config, **owned_values(run, world_size)}
    zero: dict[str, Any] = {"stage": run.deepspeed_zero_stage}
    if run.deepspeed_offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if run.deepspeed_offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {**owned_values(run, world_size), "bf16": {"enabled": cuda}, "zero_optimization": zero,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config["zero_optimization"].get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


class DeepSpeedEngine:
    """The torch engine's model and loss under ``deepspeed.initialize``; see the module docstring."""

    name = "deepspeed"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv, run_dir: Path):
        import deepspeed

        self.env = env
        if not dist.is_initialized():  # one rank: DeepSpeed still wants a process group
            init_process_group(env)
        self.inner = TorchEngine(run, model_path, env.device())
        self.device = self.inner.device
        self.config = deepspeed_config(run, env.world_size, self.device.type == "cuda")
        if env.is_main:
            write_json(run_dir / "deepspeed_config.json", self.config)
        params = self.inner.trainable_parameters()
        if offloads_optimizer(self.config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(params, lr=run.learning_rate, weight_decay=run.weight_decay,
                                              adamw_mode=True)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay)
        self.ds, *_ = deepspeed.initialize(model=self.inner.model, optimizer=self.optimizer, config=self.config)
        if not hasattr(self.ds, "managed_gradient_accumulation"):  # older releases ignore the key silently
            raise TrainError(f"deepspeed {deepspeed.__version__} is too old: train_engine: deepspeed needs 0.19.8 "
                             "or later (pip install --no-build-isolation 'deepspeed>=0.19.8')")
        self.model = self.ds.module
        self.dtype = torch.bfloat16 if self.ds.bfloat16_enabled() else torch.float32
        log.info("deepspeed: ZeRO stage %d, %s, optimizer offload %s", self.ds.zero_optimization_stage(),
                 self.dtype, offloads_optimizer(self.config))

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.inner.objective is not None:
            return self.inner.objective.loss_sum(self.model, batch, self.device)
        logits = self.ds(**model_inputs(batch, self.device, self.dtype)).logits
        return loss_sum(logits, batch["labels"])

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.env.world_size, scale_wrt_gas=False)

    def step(self, max_norm: float) -> float:
        """Reduce, clip (DeepSpeed's gradient_clipping = max_norm), update, zero; the norm before clipping."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def load(self, path: Path, state: dict[str, Any]) -> None:
        if state.get("world_size") != self.env.world_size:
            raise TrainError(f"{path}: a DeepSpeed checkpoint of {state.get('world_size')} ranks cannot resume on "
                             f"{self.env.world_size}; run on {state.get('world_size')} ranks, or delete "
                             f"{path.parent} to start over")
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise TrainError(f"{path}: DeepSpeed could not load this checkpoint")

    def save_checkpoint(self, root: Path, scheduler, position: ckpt.Position, config_hash: str,
                        keep_last: int) -> None:
        """Collective: every rank writes its partition into ``.step-N.partial``; rank 0 completes it."""
        dest = root / f"step-{position.step}"
        partial = root / f".{dest.name}.partial"
        if self.env.is_main:
            for stale in root.glob(".step-*.partial"):  # left by a job killed mid-save
                shutil.rmtree(stale)
        dist.barrier()
        self.ds.save_checkpoint(str(root), tag=partial.name, save_latest=False, exclude_frozen_parameters=True)
        dist.barrier()
        if self.env.is_main:
            torch.save({"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "position": asdict(position),
                        "config_hash": config_hash, "engine": self.name, "world_size": self.env.world_size},
                       partial / ckpt.STATE_FILE)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(partial, dest)
            for old in ckpt.list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def save_final(self, dest: Path) -> None:
        """The trainable parameters' fp32 master weights, gathered (collective), as a PEFT folder."""
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {name: safe_get_full_fp32_param(p).detach().cpu()
                   for name, p in self.model.named_parameters() if p.requires_grad}
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
