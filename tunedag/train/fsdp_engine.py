"""``train_engine: fsdp``: the torch engine's model under FSDP2 ``fully_shard``, every decoder layer
then the root.

FSDP averages gradients over ranks; the loss is scaled by the world size so the reduced gradient
is the sum the loop's token mean needs (exact for a power-of-two world size).

LoRA (frozen base + adapter in one unit): the model is loaded whole on every rank, then sharded.
Checkpoints hold the full (gathered) adapter weights and a full optimizer state keyed by parameter
name; the final adapter is gathered the same way.

Full fine-tuning (``adapter: null``): the model is built on the meta device, sharded, and every
rank copies its shard of each weight out of the base model's safetensors one tensor at a time, so
no rank ever holds a whole fp32 copy. On CUDA the layers compute in bf16 (FSDP's mixed precision:
bf16 all-gathered weights) and gradients are reduced in fp32 onto the fp32 sharded weights; the
optimizer state is sharded like them. Checkpoints are ``torch.distributed.checkpoint`` folders
(each rank writes its shards of the trained weights and optimizer state; a checkpoint resumes on
any number of ranks). The final model is gathered tensor by tensor into rank 0's CPU memory and
saved as an HF folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tunedag.config import RunConfig
from tunedag.io import atomic_path
from tunedag.models.loading import fresh_causal_lm
from tunedag.models.vocab import ADAPTER_SAVE, grow_rows
from tunedag.train.engines import OPTIMIZER_FILE, EngineError, TorchEngine, make_optimizer
from tunedag.train.ranks import DistEnv, init_process_group

DCP_FOLDER = "dcp"  # a full fine-tune's sharded checkpoint, inside the loop's checkpoint folder


def peft_key(name: str, adapter: str = "default") -> str:
    """The key PEFT saves a model parameter under: ``...q_proj.lora_A.default.weight`` →
    ``...q_proj.lora_A.weight``, ``...lm_head.modules_to_save.default.weight`` → ``...lm_head.weight``."""
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def meta_model(run: RunConfig, model_path: Path) -> torch.nn.Module:
    """The causal LM of ``model_path`` with its parameters on the meta device (its buffers, the rotary
    tables, computed on the CPU as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunedag.models.loading import check_weight_files, run_vocab_size

    check_weight_files(model_path)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=run.trust_remote_code)
    config.vocab_size = max(config.vocab_size, run_vocab_size(model_path, run) or 0)  # tokens the run adds
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=run.trust_remote_code)


def weight_files(model_path: Path) -> dict[str, Path]:
    """Each weight name of a model folder → the safetensors file that holds it."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            found.update({k: file for k in fh.keys()})
    return found


@torch.no_grad()
def load_shards_(model: torch.nn.Module, model_path: Path, fresh: torch.nn.Module | None = None) -> None:
    """Copy each rank's shard of every parameter (DTensors after ``fully_shard``) from the safetensors
    files (one full tensor in memory at a time), or from ``fresh``, the whole model freshly initialised on
    the CPU with the same seed on every rank (reinit_weights); no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    files = weight_files(model_path) if fresh is None else {}
    initialised = dict(fresh.named_parameters()) if fresh is not None else {}
    for name, param in model.named_parameters():
        if fresh is not None:
            full = initialised[name].detach()
        elif name not in files:
            raise EngineError(f"{model_path}: no weight {name} in its safetensors files (not the model its "
                              "config.json describes)")
        else:
            with safe_open(files[name], framework="pt") as fh:
                full = fh.get_tensor(name).to(torch.float32)
        if param.dim() == 2:  # the embedding rows of tokens the run adds (tunedag.models.vocab)
            full = grow_rows(full, param.shape[0])
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(full)
        else:
            param.copy_(full)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


class FSDPEngine:
    """See the module docstring; the loop's engine protocol is in :mod:`tunedag.train.engines`."""

    name = "fsdp"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.env, self.full = env, run.adapter is None
        if not torch.distributed.is_initialized():  # one rank: FSDP still wants a process group
            init_process_group(env, device)
        base = meta_model(run, model_path) if self.full else None
        self.inner = TorchEngine(run, model_path, device, base=base)
        self.model, self.device, self.objective = self.inner.model, device, self.inner.objective
        policy = MixedPrecisionPolicy()
        if self.full and device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(self.model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)
        if self.full:
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.model.to_empty(device=device)
            with torch.no_grad():
                for name, value in buffers.items():
                    self.model.get_buffer(name).copy_(value)
            fresh = (fresh_causal_lm(model_path, run.reinit_seed, torch.float32, run.trust_remote_code)
                     if run.reinit_seed is not None else None)
            load_shards_(self.model, model_path, fresh)
            del fresh
        self.params = self.inner.trainable_parameters()
        self.optimizer = make_optimizer(self.params, run, model=self.model)  # over DTensor shards: not fused
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

    def _gathered_weights(self, frozen: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model, options=self._options(ignore_frozen_params=not frozen))

    def _sharded_state(self) -> dict[str, Any]:
        """A full fine-tune's trained weights and optimizer state, as each rank's shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(ignore_frozen_params=True)
        return {"model": get_model_state_dict(self.model, options=options),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options)}

    def write_payload(self, folder: Path) -> None:
        """Collective. Full fine-tuning: every rank writes its shards (torch.distributed.checkpoint);
        LoRA: the full adapter and optimizer state, gathered, written by rank 0."""
        if self.full:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._sharded_state(), checkpoint_id=folder / DCP_FOLDER)
            return
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        weights = self._gathered_weights()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if self.env.is_main:
            self.model.save_pretrained(folder, state_dict=weights, **ADAPTER_SAVE)
            torch.save(optim, folder / OPTIMIZER_FILE)

    def load_payload(self, checkpoint: Path) -> None:
        """Every rank reads its shards (full fine-tuning), or the full state and keeps its shard (LoRA)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        if self.full:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions

            if not (checkpoint / DCP_FOLDER).is_dir():
                raise EngineError(f"{checkpoint}: no {DCP_FOLDER}/ (not a full fine-tune's fsdp checkpoint); "
                                  f"delete {checkpoint.parent} to start over")
            state = self._sharded_state()
            dcp.load(state, checkpoint_id=checkpoint / DCP_FOLDER)
            options = StateDictOptions(ignore_frozen_params=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
            return
        saved = load_file(checkpoint / "adapter_model.safetensors")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        set_model_state_dict(self.model, {n: saved[peft_key(n)] for n in names},
                             options=self._options(strict=False))
        optim = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=self._options())

    def save_adapter(self, dest: Path) -> None:
        """Collective: the adapter, or with ``adapter: null`` the whole trained model, gathered; rank 0 writes."""
        weights = self._gathered_weights(frozen=self.full)
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                if self.full:
                    self.model.save_pretrained(tmp, state_dict=weights)
                else:
                    self.model.save_pretrained(tmp, state_dict=weights, **ADAPTER_SAVE)
