"""``train_engine: deepspeed``: DeepSpeed ZeRO stage 1, 2 or 3 under tunedag's training loop.

Stage 1 shards the optimizer state over the ranks, 2 the gradients too, 3 the weights too; 1 and 2
keep every weight whole on every rank (one optimizer class in DeepSpeed, the same paths here).

The DeepSpeed JSON is generated from config.yaml (:func:`deepspeed_config`) and written to
``{run_dir}/deepspeed_config.json``; ``deepspeed_config: path.json`` replaces the generated one
by the user's, checked by :mod:`tunedag.deepspeed_json` when the config is validated.

- Precision: bf16 weights with fp32 master copies in the optimizer on CUDA; fp32 on CPU.
- Optimizer: the client optimizer of ``optimizer`` (:mod:`tunedag.train.optimizers`; ZeRO updates
  flat partitions, so adafactor keeps an unfactored second moment here); with optimizer offload
  DeepSpeed's ``DeepSpeedCPUAdam`` (AdamW's update, AVX on the CPU; compiled on first use).
  The learning-rate schedule is the loop's, on that optimizer's parameter groups.
- Gradients: ``managed_gradient_accumulation: false``, so every ``step()`` is an optimizer step
  after however many micro-batches the loop fed (an epoch's last step may hold fewer).
  ``backward(loss, scale_wrt_gas=False)`` keeps DeepSpeed from dividing by the accumulation
  steps, and the loss is multiplied by the world size because ZeRO averages gradients over
  ranks: the reduced gradient is the sum the loop's token mean needs (exact for a power-of-two
  world size). DeepSpeed clips to ``max_grad_norm`` with torch's formula.
- Checkpoints: DeepSpeed's own format (each rank writes its optimizer partition; frozen base
  weights are left out) as the engine's payload in the loop's checkpoint folder. A checkpoint
  resumes on the same number of ranks only (ZeRO partitions depend on it).
- Final adapter: the fp32 master weights of the trainable parameters, gathered from every
  rank's partition, saved by rank 0 as a PEFT folder.

Full fine-tuning (``adapter: null``) with ZeRO-3 builds the model under ``deepspeed.zero.Init``
(:func:`zero3_model`): no rank holds the whole model. LoRA, and ZeRO-1/2, load the base whole on every
rank first, so it must fit one device in fp32.

Preference training (``rl``) runs on ZeRO-1/2 only (config validation refuses ZeRO-3). A full fine-tune's
dpo/kto reference model (:func:`tunedag.train.preference.frozen_reference`) lives outside DeepSpeed:
whole on every rank, bf16 on CUDA: 2 bytes per parameter beside the trained model's bf16 weights and
gradients (2 + 2, whole at ZeRO-1) and fp32 master weights and AdamW moments (12, sharded over the ranks).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig

from tunedag.config import RunConfig
from tunedag.deepspeed_json import check_user_config, owned_values, read_user_config, resolve_auto
from tunedag.io import atomic_path
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.models.logprobs import SequenceLogps
from tunedag.models.vocab import ADAPTER_SAVE
from tunedag.train.engines import EngineError, TorchEngine, make_optimizer
from tunedag.train.ranks import DistEnv, init_process_group

log = logging.getLogger(__name__)


def deepspeed_config(run: RunConfig, world_size: int, cuda: bool, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``run`` on ``world_size`` ranks: the user's (its "auto" values filled in,
    bucket sizes from the model's ``hidden_size``), or generated from config.yaml."""
    owned = owned_values(run.micro_batch_size, run.gradient_accumulation_steps, run.max_grad_norm, world_size)
    if run.optimizer not in ("adamw_torch", "adamw_torch_fused"):  # ZeRO wraps any torch optimizer, if told to
        owned["zero_allow_untested_optimizer"] = True
    if run.deepspeed_config:
        config = read_user_config(run.deepspeed_config)
        check_user_config(config, owned, run.deepspeed_config)
        return {**resolve_auto(config, hidden_size, cuda), **owned}
    zero: dict[str, Any] = {"stage": run.deepspeed_zero_stage}
    if run.deepspeed_offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if run.deepspeed_offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {**owned, "bf16": {"enabled": cuda}, "zero_optimization": zero,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config["zero_optimization"].get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def zero3_model(run: RunConfig, model_path: Path, config: dict[str, Any]) -> torch.nn.Module:
    """The causal LM built under ``deepspeed.zero.Init``: every weight is partitioned over the ranks as it
    is created, and rank 0 reads the safetensors into the partitions (transformers' ZeRO-3 loading, on
    while an ``HfDeepSpeedConfig`` of ``config`` lives), so no rank holds the whole model."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from tunedag.models.loading import load_causal_lm, run_vocab_size

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # zero.Init asks deepspeed.comm for the ranks
    zero3 = HfDeepSpeedConfig(config)  # noqa: F841  (transformers holds only a weak reference to it)
    return load_causal_lm(model_path, torch.float32, run.trust_remote_code, run.reinit_seed,
                          run_vocab_size(model_path, run))


class DeepSpeedEngine:
    """The torch engine's model and loss under ``deepspeed.initialize``; see the module docstring."""

    name = "deepspeed"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv, device: torch.device):
        import deepspeed

        self.env = env
        if not dist.is_initialized():  # one rank: DeepSpeed still wants a process group
            init_process_group(env, device)
        self.config = deepspeed_config(run, env.world_size, device.type == "cuda",
                                       hidden_size=AutoConfig.from_pretrained(
                                           model_path, trust_remote_code=run.trust_remote_code).hidden_size)
        zero3_init = run.adapter is None and self.config["zero_optimization"]["stage"] == 3
        base = zero3_model(run, model_path, self.config) if zero3_init else None
        self.inner = TorchEngine(run, model_path, device, base=base)
        self.device, self.objective = device, self.inner.objective
        self.run_files = {"deepspeed_config.json": self.config}
        params = self.inner.trainable_parameters()
        if offloads_optimizer(self.config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(params, lr=run.learning_rate, weight_decay=run.weight_decay,
                                              betas=(run.adam_beta1, run.adam_beta2), eps=run.adam_epsilon,
                                              adamw_mode=True)
        else:
            self.optimizer = make_optimizer(params, run)
        self.ds, *_ = deepspeed.initialize(model=self.inner.model, optimizer=self.optimizer, config=self.config)
        if not hasattr(self.ds, "managed_gradient_accumulation"):  # older releases ignore the key silently
            raise EngineError(f"deepspeed {deepspeed.__version__} is too old: train_engine: deepspeed needs 0.19.8 "
                              "or later (pip install --no-build-isolation 'deepspeed>=0.19.8')")
        self.model = self.ds.module
        self.dtype = torch.bfloat16 if self.ds.bfloat16_enabled() else torch.float32
        self.info: dict[str, Any] = {"model_engine": "torch", "zero_stage": self.ds.zero_optimization_stage(),
                                     "optimizer_offload": offloads_optimizer(self.config), "zero_init": zero3_init}
        log.info("deepspeed: ZeRO stage %d, %s, optimizer offload %s", self.ds.zero_optimization_stage(),
                 self.dtype, offloads_optimizer(self.config))

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """The dpo/kto reference's log-probs of a preference batch."""
        return self.objective.live_reference(self.model, batch, self.device)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.objective is not None:
            return self.objective.loss_sum(self.model, batch, self.device)
        logits = self.ds(**model_inputs(batch, self.device, self.dtype, self.model.config)).logits
        return loss_sum(logits, batch["labels"])

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.env.world_size, scale_wrt_gas=False)

    def step(self, max_norm: float | None) -> float:
        """Reduce, clip (DeepSpeed's gradient_clipping = max_norm), update, zero; the norm before clipping."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def write_payload(self, folder: Path) -> None:
        """Collective: every rank writes its partition (the frozen base is left out)."""
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                                exclude_frozen_parameters=True)

    def load_payload(self, checkpoint: Path) -> None:
        ranks = len(list(checkpoint.glob("*optim_states.pt")))  # one optimizer partition per rank
        if ranks != self.env.world_size:
            raise EngineError(f"{checkpoint}: a DeepSpeed checkpoint of {ranks} ranks cannot resume on "
                              f"{self.env.world_size}; run on {ranks} ranks, or delete {checkpoint.parent} "
                              "to start over")
        loaded, _ = self.ds.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False,
                                                 load_lr_scheduler_states=False)
        if loaded is None:
            raise EngineError(f"{checkpoint}: DeepSpeed could not load this checkpoint")

    def save_adapter(self, dest: Path) -> None:
        """Collective: the trainable parameters' fp32 master weights, gathered, as a PEFT folder; with
        ``adapter: null`` every weight (the frozen ones gathered as they are) as an HF model folder."""
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                weights[name] = safe_get_full_fp32_param(p).detach().cpu()
            elif self.inner.full:
                weights[name] = gathered(p).float()
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                if self.inner.full:
                    self.model.save_pretrained(tmp, state_dict=weights)
                else:
                    self.model.save_pretrained(tmp, state_dict=weights, **ADAPTER_SAVE)


def gathered(param: torch.nn.Parameter) -> torch.Tensor:
    """A copy of a frozen parameter on the CPU, whole (ZeRO-3 holds a partition of it on each rank)."""
    if not hasattr(param, "ds_id"):  # ZeRO-1 and ZeRO-2 leave parameters whole
        return param.detach().cpu().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().cpu().clone()
