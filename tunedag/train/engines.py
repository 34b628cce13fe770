"""Training engines: one protocol, one ``make_engine``.

Every engine gives the loop (:func:`tunedag.train.loop.train`) the same few things:

- ``name``, ``device``, ``model`` (the PEFT model; with ``adapter: null`` the HF model), ``objective``
  (None, or the rl objective), ``optimizer`` (whose parameter groups the loop's schedule drives),
  ``info`` (what train_info.json records about it);
- ``loss_sum(batch)``: the summed loss of one micro-batch; ``backward(loss)``;
  ``step(max_norm)``: reduce gradients across ranks, clip, update, zero; the norm before clipping;
- ``write_payload(folder)`` / ``load_payload(checkpoint)``: its trainable weights and optimizer
  state inside a checkpoint (the loop's one writer, :func:`tunedag.train.checkpoint.write_checkpoint`,
  adds the rest); ``save_adapter(dest)``: the final PEFT adapter, or with ``adapter: null`` the trained
  model as an HF folder, safetensors + config (collective, rank 0 writes).

What builds the model of one process: ``torch`` (:class:`TorchEngine`, plain HF transformers +
PEFT: the reference every faster engine is compared to) or ``triton``
(:class:`tunedag.train.triton_engine.TritonEngine`, the decoder on tunedag's kernels). What spreads
it over ranks: :class:`ReplicatedEngine` (one process; on several ranks ``ddp``: every rank holds
the whole model and the trainable gradients are summed across ranks), ``fsdp``
(:mod:`tunedag.train.fsdp_engine`) or ``deepspeed`` (:mod:`tunedag.train.deepspeed_engine`).

:func:`make_engine` picks, for ``train_engine``:

| ranks | auto, triton, ddp | torch | fsdp | deepspeed |
| --- | --- | --- | --- | --- |
| one, on a GPU | triton | torch | fsdp | deepspeed |
| several | ddp over triton | ddp over torch | fsdp | deepspeed |

and falls back from triton to torch (CPU without ``TRITON_INTERPRET=1``, an architecture or
setting the fast path does not cover, ``rl: reward`` or ``prm``) with the reason logged and recorded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedModel

from tunedag.config import RunConfig
from tunedag.errors import TunedagError
from tunedag.io import atomic_path
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.models.loading import load_causal_lm, run_vocab_size
from tunedag.models.logprobs import SequenceLogps
from tunedag.models.vocab import ADAPTER_SAVE
from tunedag.models.fp8 import convert_to_fp8, require_fp8_device
from tunedag.models.qat import prepare_qat
from tunedag.models.qlora import fake_quantize_
from tunedag.models.moe import aux_loss_enabled, hf_moe_loss_sum
from tunedag.models.registry import lora_target_kwargs
from tunedag.models.prm_head import load_prm_model
from tunedag.models.reward_head import load_reward_model
from tunedag.train.memory_model import build_setting, resolve_checkpointing
from tunedag.train.optimizers import build_optimizer
from tunedag.train.preference import preference_objective
from tunedag.train.ranks import DistEnv, choose_device
from tunedag.train.prm import PRMObjective
from tunedag.train.reward import RewardObjective

log = logging.getLogger(__name__)
OPTIMIZER_FILE = "optimizer.pt"
BUCKET_NUMEL = 1 << 26  # ddp's gradient all-reduce: 256 MB of fp32 per collective


class EngineError(TunedagError, RuntimeError):
    """An engine cannot start or resume here (a missing or too old package, a checkpoint of another layout)."""


class TorchEngine:
    """HF model + PEFT LoRA, or with ``adapter: null`` the HF model itself (every weight trained, or
    those ``unfrozen_parameters`` names); fp32 weights (bf16 under ``master_weights: bf16_kahan``), bf16
    autocast on CUDA. ``base``: the HF model already built and placed (fsdp builds it on the meta device,
    deepspeed's ZeRO-3 partitioned)."""

    name = "torch"

    def __init__(self, run: RunConfig, model_path: Path, device: torch.device, base: PreTrainedModel | None = None):
        self.device, self.full = device, run.adapter is None
        self.weight_dtype = torch.float32  # the model's weights: fp32, or bf16 under master_weights: bf16_kahan
        reward, prm = run.rl == "reward", run.rl == "prm"
        placed = base is not None  # on the meta device, or partitioned by ZeRO-3: left where it is
        if base is None:  # rl: reward, the decoder under a scalar head; rl: prm, under a 2-label token head
            base = (load_reward_model(model_path, torch.float32, run.trust_remote_code, run.seed) if reward
                    else load_prm_model(model_path, torch.float32, run.trust_remote_code, run.seed) if prm
                    else load_causal_lm(model_path, torch.float32, run.trust_remote_code, run.reinit_seed,
                                        run_vocab_size(model_path, run)))
        # before anything changes the base: a full fine-tune's dpo/kto reference is a frozen copy of it
        self.objective = (RewardObjective(run) if reward else PRMObjective() if prm else
                          preference_objective(run, base, device, self.full) if run.rl else None)
        if run.adapter == "qlora":
            n = fake_quantize_(base)
            log.info("torch engine, qlora: %d projections hold their NF4-dequantised values "
                     "(the numerics of a 4-bit base, not its memory saving)", n)
        low_precision_(base, run, device)
        if build_setting(run) != "off":  # offload is the triton engine's: here checkpointing on the GPU
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
            if run.gradient_checkpointing_skip_layers:
                log.warning("gradient_checkpointing_skip_layers: %d is the triton engine's; HF's checkpointing "
                            "here recomputes every layer", run.gradient_checkpointing_skip_layers)
        if self.full:
            n = unfreeze_only(base, run.unfrozen_parameters)
            log.info("full fine-tuning: %d of %d parameter tensors trained", n, len(list(base.parameters())))
            if run.master_weights == "bf16_kahan":  # tunedag.train.kahan_adamw updates them
                self.weight_dtype = torch.bfloat16
                cast_parameters_(base, torch.bfloat16)
            self.model = base if placed else base.to(device)
            self.model.train()
            return
        lora = LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                          **lora_target_kwargs(base.config, run.lora_target_modules), bias="none",
                          # SEQ_CLS and TOKEN_CLS train `score` in full
                          task_type="SEQ_CLS" if reward else "TOKEN_CLS" if prm else "CAUSAL_LM",
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
        """Summed next-token loss of one micro-batch (packed samples never see each other); with ``rl``,
        the summed preference loss of its pairs or samples (tunedag.train.preference), or with
        ``rl: reward`` the reward model's (tunedag.train.reward)."""
        if self.objective is not None:
            return self.objective.loss_sum(self.model, batch, self.device, self.autocast)
        with self.autocast():
            inputs = model_inputs(batch, self.device, self.weight_dtype, self.model.config)
            if aux_loss_enabled(self.model.config):  # MoE router loss on
                return hf_moe_loss_sum(self.model, inputs, batch["labels"], batch["segment_ids"].reshape(-1) > 0)
            logits = self.model(**inputs).logits
        return loss_sum(logits, batch["labels"])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """The dpo/kto reference's log-probs of a preference batch (the policy's precision)."""
        with self.autocast():
            return self.objective.live_reference(self.model, batch, self.device)

    def load_trainable(self, checkpoint: Path) -> None:
        load_trainable(self.model, checkpoint, self.full)

    def save(self, dest: Path) -> None:
        """The PEFT adapter, or with ``adapter: null`` the whole model (HF folder: safetensors + config)."""
        if self.full:
            self.model.save_pretrained(dest)
        else:
            self.model.save_pretrained(dest, **ADAPTER_SAVE)


def low_precision_(model: torch.nn.Module, run: RunConfig, device: torch.device) -> None:
    """``qat``: every linear layer fake-quantized (tunedag.models.qat); ``fp8``: the linear layers' matmuls in
    float8 (tunedag.models.fp8), refused on a device without float8 matmuls. In place, before any wrapping."""
    if run.qat is not None:
        q = run.qat
        n = prepare_qat(model, q.weight_dtype, q.activation_dtype, q.group_size)
        log.info("qat: %d linear layers fake-quantize %s weights and %s activations", n, q.weight_dtype,
                 q.activation_dtype)
    if run.fp8:
        require_fp8_device(device)
        names = convert_to_fp8(model)
        log.info("fp8: %d linear layers compute in float8 (the first and last stay in bf16)", len(names))


def cast_parameters_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only: buffers (rotary inv_freq) keep their fp32 values."""
    for p in model.parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


def unfreeze_only(model: torch.nn.Module, patterns: Sequence[str]) -> int:
    """Train the parameters whose names one of ``patterns`` matches (``re.search``, as Axolotl's
    ``unfrozen_parameters``; none given: every parameter), freeze the rest; the number trained."""
    names = [n for n, _ in model.named_parameters()]
    chosen = {n for n in names if not patterns or any(re.search(p, n) for p in patterns)}
    if not chosen:
        raise EngineError(f"unfrozen_parameters {list(patterns)} match no parameter of this model; its names "
                          f"look like {', '.join(names[:3])}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return len(chosen)


def load_trainable(model: torch.nn.Module, checkpoint: Path, full: bool) -> None:
    """A checkpoint's trained weights into ``model``: every trainable weight of a full fine-tune
    (an HF folder), or the PEFT adapter."""
    if full:
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, tensor in read_weights(checkpoint, set(trained)).items():
                trained[name].copy_(tensor)
        return
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))


def read_weights(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from the safetensors files of a saved model folder (a full fine-tune's checkpoint)."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in set(fh.keys()) & names:
                found[key] = fh.get_tensor(key)
    missing = names - set(found)
    if missing:
        raise EngineError(f"{folder}: no weight for {', '.join(sorted(missing)[:3])} (a checkpoint of another "
                          f"model or unfrozen_parameters); delete {folder.parent} to start over")
    return found


def make_optimizer(params: list[torch.nn.Parameter], run: RunConfig, fused: bool = False,
                   model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """``run.optimizer`` over ``params`` (:mod:`tunedag.train.optimizers`), named as in ``model`` when
    given (muon splits them by name)."""
    if model is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        params = [(names[id(p)], p) for p in params]
    return build_optimizer(params, run.optimizer, run.learning_rate, run.weight_decay, fused,
                           betas=(run.adam_beta1, run.adam_beta2), eps=run.adam_epsilon,
                           master_weights=run.master_weights)


class ReplicatedEngine:
    """The model of one process (triton or torch) on every rank. On one rank it is that engine; on
    several it is ``ddp``: after backward the trainable gradients are summed across ranks in one
    all-reduce (LoRA weights are a few MB), so only they travel; the frozen base never does."""

    def __init__(self, inner: Any, run: RunConfig, env: DistEnv):
        self.inner, self.env = inner, env
        self.name = "ddp" if env.world_size > 1 else inner.name
        self.model, self.device, self.objective = inner.model, inner.device, inner.objective
        self.params = inner.trainable_parameters()
        self.optimizer = make_optimizer(self.params, run, fused=self.device.type == "cuda", model=self.model)
        self.info: dict[str, Any] = {"model_engine": inner.name}
        self.run_files: dict[str, Any] = {}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.loss_sum(batch)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        return self.inner.reference_logps(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float | None) -> float:
        """Sum the gradients over ranks, clip, update, zero them; return the norm before clipping."""
        if self.env.world_size > 1:
            all_reduce_sum([p.grad for p in self.params if p.grad is not None])
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def write_payload(self, folder: Path) -> None:
        if self.env.is_main:  # replicas are identical: rank 0's state is everyone's
            self.inner.save(folder)
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_payload(self, checkpoint: Path) -> None:
        self.inner.load_trainable(checkpoint)
        self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, map_location=self.device,
                                                  weights_only=True))

    def save_adapter(self, dest: Path) -> None:
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                self.inner.save(tmp)


def all_reduce_sum(tensors: list[torch.Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Sum ``tensors`` across ranks in place, in flat buckets of about ``bucket_numel`` elements: few
    collectives, and at most one bucket's extra memory (a LoRA adapter's gradients are one bucket)."""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if buckets[-1] and size + t.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel()
    for bucket in filter(None, buckets):
        flat = torch.cat([b.reshape(-1) for b in bucket])
        torch.distributed.all_reduce(flat)
        for b, summed in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(summed.view_as(b))


def triton_blocker(run: RunConfig, model_path: Path, device: torch.device) -> str | None:
    """Why the triton engine cannot train ``run`` here (None: it can). ``auto`` and ``ddp`` take it on
    CUDA only; ``triton`` also on the CPU under ``TRITON_INTERPRET=1`` (slow: for tests)."""
    if run.qat is not None or run.fp8:
        return ("qat and fp8 swap the linear layers of the HF model (fake-quantized or float8 matmuls), which the "
                "triton engine's fused kernels replace")
    if device.type != "cuda" and (run.train_engine != "triton" or os.environ.get("TRITON_INTERPRET") != "1"):
        return "no CUDA GPU (the Triton kernels run on the CPU only under TRITON_INTERPRET=1 with train_engine: triton)"
    from transformers import AutoConfig

    from tunedag.models.registry import fast_path_blocker

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=run.trust_remote_code)
    # a full fine-tune has no LoRA dropout, whatever lora_dropout says
    return fast_path_blocker(config, rl=run.rl, lora_dropout=run.lora_dropout if run.adapter else 0.0,
                             lora_target_modules=run.lora_target_modules,
                             lora_modules_to_save=run.lora_modules_to_save)


def model_kind(run: RunConfig, model_path: Path, device: torch.device) -> tuple[str, str | None]:
    """triton where it can run (unless ``train_engine: torch``), else torch and the reason."""
    if run.train_engine == "torch":
        return "torch", None
    reason = triton_blocker(run, model_path, device)
    if reason is None:
        return "triton", None
    log.info("train_engine %s: using the torch engine because %s", run.train_engine, reason)
    return "torch", reason


def build_model_engine(kind: str, run: RunConfig, model_path: Path, device: torch.device) -> Any:
    if kind == "triton":
        from tunedag.train.triton_engine import TritonEngine

        return TritonEngine(run, model_path, device)
    return TorchEngine(run, model_path, device)


def model_engine(run: RunConfig, model_path: Path, device: torch.device) -> tuple[Any, str | None]:
    """The model of one process (see :func:`model_kind`) and why it is not triton."""
    kind, reason = model_kind(run, model_path, device)
    return build_model_engine(kind, run, model_path, device), reason


def make_engine(run: RunConfig, model_path: Path, env: DistEnv):
    """The engine for ``run`` on this rank (see the module docstring's table)."""
    device = choose_device(env)
    if run.train_engine in ("deepspeed", "fsdp"):
        run, checkpointing = resolve_checkpointing(run, model_path, device, run.train_engine)
        if run.train_engine == "deepspeed":
            from tunedag.train.deepspeed_engine import DeepSpeedEngine

            engine = DeepSpeedEngine(run, model_path, env, device)
        else:
            from tunedag.train.fsdp_engine import FSDPEngine

            engine = FSDPEngine(run, model_path, env, device)
    else:
        kind, reason = model_kind(run, model_path, device)
        run, checkpointing = resolve_checkpointing(run, model_path, device, kind)  # before the weights load
        engine = ReplicatedEngine(build_model_engine(kind, run, model_path, device), run, env)
        if reason is not None:
            engine.info["fallback_reason"] = reason
    engine.info["gradient_checkpointing"] = checkpointing
    return engine

