"""The ``triton`` engine: a peft LoRA/QLoRA model, or a fully fine-tuned HF model, whose decoder runs
on tunedag's kernels.

Supports (``tunedag.models.registry`` lists the architectures; anything else falls back to
the torch engine with a logged reason):

- LoRA on all seven projections (lora_dropout 0, no LoRA bias), or QLoRA with the base
  projections in 4-bit NF4 (``adapter: qlora``), dequantised inside the fused kernels;
- full fine-tuning (``adapter: null``): the HF model itself, every parameter trained or those
  ``unfrozen_parameters`` names; the same fused kernels run without A/B and return the gradient of
  each projection, norm, embedding and lm_head weight that requires grad (frozen ones cost none);
  with ``rl`` (dpo, orpo, kto) too;
- embed_tokens / lm_head trained in full (``lora_modules_to_save``): kept in fp32 as master
  weights, cast to the compute dtype per step; the fused cross-entropy returns the lm_head
  gradient directly;
- packed micro-batches computed on their real tokens only: rows are flattened to N tokens
  (padding dropped) and attention never crosses samples (``packed_attention``);
- gradient checkpointing off / on / offload (``gradient_checkpointing``, ``auto`` decided by
  :mod:`tunedag.train.memory_model` before the model loads), per decoder layer;
- preference training (``rl: dpo | orpo | kto``): the same decoder gives the final hidden states of
  chosen and rejected (or kto samples) in one packed pass, and ``PreferenceObjective`` turns them
  into chunked response log-probs and its loss. The reference (dpo, kto) is this model under
  ``adapters_off()`` (no_grad, the patched model's ``AdapterSwitch`` off; peft's ``disable_adapter()``
  is honoured too but walks the whole model per call): the fused modules run the frozen base alone
  (no LoRA matmuls) and trained embed_tokens / lm_head give way to the frozen originals; nothing is
  saved for backward. A full fine-tune has no adapters to switch off: its dpo/kto reference is the
  frozen copy of the base as loaded (:func:`tunedag.train.preference.frozen_reference`, bf16 on CUDA),
  run through transformers' decoder under no_grad and bf16 autocast (no backward, so no kernel of ours
  is needed).
  ``rl: reward`` and ``prm`` (a score head, not an LM head) stay on the torch engine.

Precision: on CUDA the frozen base is bf16 (rotary buffers stay fp32, as the torch engine's
fp32 model under bf16 autocast computes them); LoRA A/B and fully trained modules are fp32
master weights, cast to bf16 inside the kernels, their gradients returned in fp32; the loss
log-sum-exp is fp32. On the CPU everything is fp32 (the reference comparisons in tests).

Full fine-tuning keeps the same rule: trained weights are fp32 masters (the optimizer updates them in
fp32), cast to bf16 per call inside the fused kernels (forward, and again in backward: no bf16 copy
is kept between them), gradients come back from bf16 matmuls as fp32, as under the torch engine's
autocast; frozen weights are bf16. That is 16 bytes per trained parameter with AdamW (weight 4,
gradient 4, moments 8) against 12 for bf16 weights and gradients with a stochastically rounded or
Kahan-compensated update (14). Chosen because an AdamW step moves a weight by about the learning
rate (1e-5 in a typical full fine-tune) while bf16 weights near 0.02 are 1.2e-4 apart, so only a
master copy or a compensated update keeps those steps, and of the two only the master copy lets
every ``optimizer`` (fused AdamW, 8-bit AdamW, Adafactor) run unchanged. Measured on an H200
(BENCHMARKS.md, "Full fine-tuning"): after 150 steps at lr 1e-5 the loss is within 0.013 of an
fp32 run (the torch engine's autocast: 0.018), where plain bf16 weights stall 3.8 above it.
``master_weights: bf16_kahan`` takes the other road: trained weights in bf16 (gradients then bf16 too),
updated by :class:`tunedag.train.kahan_adamw.KahanAdamW` (8 bytes per parameter with adamw_torch_8bit).

The loss is never computed from [tokens, vocab] logits: ``loss_sum`` ends in the chunked fused
linear + cross-entropy, or with ``rl`` in the fused per-token log-probs (the same kernel's rows). Its interface is the torch engine's, so the shared loop, checkpoints
and peft adapter files are the same.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import PreTrainedModel

from tunedag.config import RunConfig
from tunedag.data.formats import IGNORE_INDEX
from tunedag.kernels.cross_entropy import fused_linear_cross_entropy
from tunedag.models.logprobs import LinearHead, SequenceLogps, hidden_logps
from tunedag.models.loading import load_causal_lm, run_vocab_size
from tunedag.models.vocab import ADAPTER_SAVE
from tunedag.models.packed_attention import PackedSequences
from tunedag.models.patching import patch_model
from tunedag.models.qlora import quantize_base_weights
from tunedag.models.moe import add_router_loss, aux_loss_enabled
from tunedag.models.registry import ARCHITECTURES, lora_target_kwargs
from tunedag.train.engines import cast_parameters_, load_trainable, unfreeze_only
from tunedag.train.layer_checkpoint import Mode, run_layers
from tunedag.train.memory_model import build_setting
from tunedag.train.preference import preference_objective

log = logging.getLogger(__name__)


def _active(module: torch.nn.Module, adapters: bool = True) -> torch.nn.Module:
    """The trained copy inside peft's ModulesToSaveWrapper (the frozen original with ``adapters`` off
    or inside peft's ``disable_adapter()``), else the module itself."""
    if isinstance(module, ModulesToSaveWrapper):
        if not adapters or module.disable_adapters:
            return module.original_module
        return module.modules_to_save[module.active_adapters[0]]
    return module


class TritonEngine:
    """peft LoRA/QLoRA on a patched HF model, or the patched HF model itself (``adapter: null``); same
    interface as ``TorchEngine``."""

    name = "triton"

    def __init__(self, run: RunConfig, model_path: Path | None, device: torch.device,
                 base: PreTrainedModel | None = None):
        self.device = device
        self.compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if base is None:
            base = load_causal_lm(model_path, torch.float32, run.trust_remote_code, run.reinit_seed,
                                  run_vocab_size(model_path, run))
        self.full = run.adapter is None
        if run.trains_classifier:
            raise ValueError(f"rl: {run.rl} trains on the torch engine (a score head, not an LM head)")
        # before patching: a full fine-tune's dpo/kto reference is a frozen copy of the base as loaded
        self.objective = preference_objective(run, base, device, self.full) if run.rl else None
        if self.full:
            model, nf4 = self._full_model(base, run), {}
        else:
            model = self._lora_model(base, run)
            nf4 = quantize_base_weights(model) if run.adapter == "qlora" else {}
        self.patches = patch_model(model, nf4)
        self.checkpointing: Mode = build_setting(run)
        self.skip_layers = run.gradient_checkpointing_skip_layers if self.checkpointing != "off" else 0
        log.info("triton engine: %s; gradient checkpointing %s%s", self.patches.summary(), self.checkpointing,
                 f" but for the last {self.skip_layers} layers" if self.skip_layers else "")
        model.train()
        self.model = model
        self.causal_lm = model if self.full else model.get_base_model()
        self.decoder = self.causal_lm.model
        self.spec = ARCHITECTURES[self.causal_lm.config.model_type]

    def _lora_model(self, base: PreTrainedModel, run: RunConfig) -> torch.nn.Module:
        """peft LoRA over the base in the compute dtype; fp32 master copies of everything trained."""
        cast_parameters_(base, self.compute_dtype)
        lora = LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=0.0,
                          **lora_target_kwargs(base.config, run.lora_target_modules), bias="none",
                          task_type="CAUSAL_LM",
                          modules_to_save=list(run.lora_modules_to_save) or None)
        model = get_peft_model(base, lora)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        return model.to(self.device)

    def _full_model(self, base: PreTrainedModel, run: RunConfig) -> torch.nn.Module:
        """The HF model itself: trained parameters (all, or those ``unfrozen_parameters`` names) as fp32
        masters (bf16 under ``master_weights: bf16_kahan``), frozen ones in the compute dtype."""
        n = unfreeze_only(base, run.unfrozen_parameters)
        trained = torch.bfloat16 if run.master_weights == "bf16_kahan" else torch.float32
        for p in base.parameters():
            if p.is_floating_point():
                dtype = trained if p.requires_grad else self.compute_dtype
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
        log.info("triton engine, full fine-tuning: %d parameter tensors trained (%s weights)", n,
                 "bf16, Kahan-compensated" if trained == torch.bfloat16 else "fp32 master")
        return base.to(self.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def adapters_off(self):
        """The reference model: the frozen base, every LoRA and trained embed_tokens / lm_head off, no grad."""
        switch = self.patches.adapters
        with torch.no_grad():
            switch.enabled = False
            try:
                yield
            finally:
                switch.enabled = True

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        embed = _active(self.decoder.embed_tokens, self.patches.adapters.enabled)
        hidden = embed(ids).to(self.compute_dtype)
        if self.spec.embed_scale and not hasattr(embed, "embed_scale"):
            # Gemma before transformers' scaled-embedding module: the model scales, with the
            # scale rounded to the activations' dtype first
            hidden = hidden * torch.tensor(self.causal_lm.config.hidden_size ** 0.5, dtype=hidden.dtype)
        if self.checkpointing != "off" and torch.is_grad_enabled() and not hidden.requires_grad:
            hidden.requires_grad_(True)  # else a checkpointed first layer would never run backward
        return hidden

    def _final_hidden(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """(N, H) final-norm hidden states of the micro-batch's real tokens (``keep``: (B*T,) on the host)."""
        seq = PackedSequences.from_batch(batch["segment_ids"], batch["position_ids"], self.device)
        # MoE: the router loss is added to supervised losses only (not to preference objectives)
        self.patches.router_logits.start(self.objective is None and aux_loss_enabled(self.causal_lm.config))
        ids = batch["input_ids"].reshape(-1)[keep][None].to(self.device, non_blocking=True)  # (1, N)
        hidden = self._embed(ids)  # (1, N, H)
        cos_sin = self._rotary(hidden, seq.position_ids)

        def call(layer, h):
            out = layer(h, attention_mask=seq, position_ids=seq.position_ids,
                        position_embeddings=cos_sin[layer.self_attn.layer_idx])
            return out[0] if isinstance(out, tuple) else out

        hidden = run_layers(self.decoder.layers, hidden, call, self.checkpointing, self.skip_layers)
        return self.decoder.norm(hidden)[0]

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> list:
        """(cos, sin) for each decoder layer: one pair for all, or one per layer type (Gemma-3's two bases).
        gpt-oss's tables are D/2 wide and rotate every dim: rotate-half's cos is [c, c], widened here once."""
        layers = range(len(self.decoder.layers))
        if self.spec.half_rope_tables:
            cos, sin = self.decoder.rotary_emb(hidden, position_ids)
            return [(torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))] * len(layers)
        if not self.spec.rope_per_layer_type:
            return [self.decoder.rotary_emb(hidden, position_ids)] * len(layers)
        types = self.causal_lm.config.layer_types
        by_type = {t: self.decoder.rotary_emb(hidden, position_ids, t) for t in set(types)}
        return [by_type[types[i]] for i in layers]

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """(weight, bias) of the LM head in the compute dtype, and the final logit softcap."""
        head = _active(self.causal_lm.lm_head, self.patches.adapters.enabled)
        weight = head.weight.to(self.compute_dtype)
        bias = head.bias.to(self.compute_dtype) if head.bias is not None else None
        softcap = getattr(self.causal_lm.config, self.spec.final_softcap_key) if self.spec.final_softcap_key else None
        return weight, bias, softcap

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Summed response log-probs of every segment of a packed preference batch (the policy, or the
        reference under ``adapters_off()``)."""
        keep = batch["segment_ids"].reshape(-1) > 0
        hidden = self._final_hidden(batch, keep)
        weight, bias, softcap = self._head()
        return hidden_logps(hidden, batch, LinearHead(weight, bias), keep, softcap=softcap)  # the fused kernel

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """The dpo/kto reference's log-probs of a preference batch: a full fine-tune's frozen base, else this
        model with its adapters off."""
        if self.objective.reference is not None:
            return self.objective.frozen_reference_logps(batch, self.device)
        with self.adapters_off():
            return self.sequence_logps(batch)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch over its real tokens only; with ``rl``, the summed
        preference loss of its pairs or samples."""
        if self.objective is not None:
            policy = self.sequence_logps(batch)
            ref = self.objective.reference_for(batch, lambda: self.reference_logps(batch))
            return self.objective.loss_from_logps(policy, ref)
        keep = batch["segment_ids"].reshape(-1) > 0
        labels = batch["labels"]
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]  # shifted within each row, as the torch engine's loss
        targets = targets.reshape(-1)[keep].to(self.device, non_blocking=True)  # (N,)
        hidden = self._final_hidden(batch, keep)
        weight, bias, softcap = self._head()
        loss = fused_linear_cross_entropy(hidden, weight, targets, bias, IGNORE_INDEX, "sum", softcap=softcap)
        if self.patches.router_logits.enabled:  # MoE router loss, over the real tokens
            loss = add_router_loss(loss, self.patches.router_logits, self.causal_lm.config,
                                   (targets != IGNORE_INDEX).sum())
        return loss

    def load_trainable(self, checkpoint: Path) -> None:
        load_trainable(self.model, checkpoint, self.full)

    def save(self, dest: Path) -> None:
        """The peft adapter, or with ``adapter: null`` the whole model (HF folder: safetensors + config;
        trained weights in fp32, frozen ones in the compute dtype)."""
        self.model.save_pretrained(dest, **({"safe_serialization": True} if self.full else ADAPTER_SAVE))
