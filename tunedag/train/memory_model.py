"""Peak GPU memory of one training step on the triton engine, per gradient-checkpointing setting, and
the choice ``gradient_checkpointing: auto`` makes from it.

A step's peak (``torch.cuda.max_memory_allocated``) is

    weights + optimizer state + max(activations + lm_head gradient,   # start of backward
                                    gradients + one layer in backward)  # end of backward (full fine-tune)
    + a fixed step overhead

with N the tokens of a micro-batch and, per token, S = the bf16 tensors one decoder layer's fused
kernels save for backward: its two residual inputs and their normed copies (4H), q and the
attention output (2q), k and v (2kv), gate and up (2I; a mixture of experts, through autograd, keeps per
expert a token visits its gathered input and output, gate_up, act and their product: 2H + 4I). Activations:

- ``off``: every layer's S; the layer in backward holds its S plus its gradients' work space,
  ``BACKWARD_LAYER_FACTOR`` x S in all;
- ``on``: every layer's input (2H bytes) plus one recomputed layer in backward;
- ``offload``: ``OFFLOAD_RESIDENT_INPUTS`` layer inputs stay on the GPU, plus one recomputed layer
  in backward;
- in both, the last k layers keep their S as under ``off``: k = ``gradient_checkpointing_skip_layers``,
  at least 1 (the last layer is never checkpointed; ``auto`` under ``on`` keeps as many as fit);

or, when larger, the stored part plus the fused cross-entropy's fp32 logits chunk. S and the weights
come from the model's shape; the three constants are fitted to the peaks measured on an H200
(``CALIBRATION``, BENCHMARKS.md "Predicted and measured peak memory"). Not covered (so ``auto``
does not use the model there): the torch, fsdp and deepspeed engines (fp32 HF models under
autocast, other activations).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from tunedag.config import RunConfig
from tunedag.train.layer_checkpoint import Mode

log = logging.getLogger(__name__)

GIB = 2**30
# fastest first: 15,837 / 11,973 / 11,467 tokens/s for the 8B shape at 4 x 4096 (BENCHMARKS.md, 2026-12-01)
FASTEST_FIRST: tuple[Mode, ...] = ("off", "on", "offload")

# Fitted to CALIBRATION's "on" rows: (peak - weights - optimizer - N x L x 2H) / (N x S) is 1.41-1.42 for the
# 8B QLoRA rows of 65,536-262,144 tokens (where fixed costs vanish), 1.39 for Phi-3-mini, 1.46-1.59 at 4,096-32,768
# tokens (where STEP_OVERHEAD is a larger share).
BACKWARD_LAYER_FACTOR = 1.42
# Fitted to the 8B QLoRA offload row at 131,072 tokens: 2.25 layer inputs per token beside the layer in backward
# (measured when the last layer was checkpointed too, its input on the GPU; now it keeps its S, counted apart).
OFFLOAD_RESIDENT_INPUTS = 2
# Fitted: the median of the rows' measured minus predicted peak without it (cuBLAS workspaces, small tensors).
STEP_OVERHEAD = int(0.15 * GIB)
# NF4 with double quantisation: 4 bits, one uint8 absmax per 64 weights, one fp32 scale per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CE_CHUNK_ROWS = 1024  # tunedag.kernels.cross_entropy's floor for a frozen lm_head
# Optimizer state bytes per trained parameter (adamw_torch_8bit/bnb: two uint8 moments; 4bit: two nibbles;
# adafactor: factored rows + columns, counted as none; muon: one momentum buffer, its AdamW part's second
# moment on embeddings and norms not counted).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_torch_8bit": 2, "adamw_torch_4bit": 1,
                         "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0, "muon": 4}
# A prediction fits when it leaves this much of the free memory unused: the caching allocator's
# fragmentation (reserved above allocated) and the CUDA workspaces max_memory_allocated does not see.
RESERVE_BYTES = 1 * GIB
RESERVE_SHARE = 0.05


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only model that its training memory depends on."""

    hidden: int
    intermediate: int  # per expert for a mixture of experts
    layers: int
    q_dim: int  # attention heads x head_dim
    kv_dim: int  # key/value heads x head_dim
    vocab: int
    tied: bool
    experts: int = 1
    active_experts: int = 1

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From an HF config (the text config of a multimodal one)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
        intermediate = (getattr(config, "moe_intermediate_size", None) if experts > 1 else None) \
            or config.intermediate_size
        return cls(hidden=config.hidden_size, intermediate=intermediate, layers=config.num_hidden_layers,
                   q_dim=heads * head_dim, kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   experts=experts,
                   active_experts=(getattr(config, "num_experts_per_tok", None) or 1) if experts > 1 else 1)

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer (an expert's for the MLP); Phi-3's packed names too."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h), "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}

    def projection_params(self) -> int:
        """Weights of every layer's linear projections (router included)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        router = h * self.experts if self.experts > 1 else 0
        return self.layers * (2 * h * q + 2 * h * kv + 3 * h * i * self.experts + router)

    def other_params(self) -> int:
        """Embedding, lm_head (unless tied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def saved_bytes_per_token(self) -> int:
        """S: the bf16 tensors one layer saves for backward, per token (see the module docstring)."""
        if self.experts > 1:  # autograd through tunedag.models.moe: per expert visited, its gathered input
            mlp = self.active_experts * (2 * self.hidden + 4 * self.intermediate)  # and output, gate_up, act, glu
        else:  # the fused SwiGLU / GeGLU kernel: gate and up
            mlp = 2 * self.intermediate
        return 2 * (4 * self.hidden + 2 * self.q_dim + 2 * self.kv_dim + mlp)


@dataclass(frozen=True)
class StepShape:
    """What a run puts through the model in one micro-batch, and what it trains."""

    tokens: int  # micro_batch_size x sequence_len (an upper bound: padding is dropped)
    adapter: str | None  # "lora", "qlora", None (full fine-tune: every weight trained, an upper bound)
    lora_r: int = 16
    lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: Sequence[str] = ()
    optimizer: str = "adamw_torch_fused"
    frozen_reference: bool = False  # a full fine-tune's dpo/kto reference: a bf16 copy of the base
    master_weights: str = "fp32"  # a full fine-tune's trained weights: fp32, or bf16 with a bf16 Kahan buffer


def lora_params(model: ModelShape, step: StepShape) -> int:
    dims = model.projection_dims()
    per_layer = 0
    for name in step.lora_targets:
        if name in dims:
            d_in, d_out = dims[name]
            per_layer += step.lora_r * (d_in + d_out) * (model.experts if name.endswith(("gate_proj", "up_proj",
                                                                                          "down_proj")) else 1)
    return model.layers * per_layer


def predict_peak(model: ModelShape, step: StepShape, setting: Mode, skip_layers: int = 0) -> dict[str, int]:
    """Predicted peak bytes of a step and its parts: weights, optimizer, gradients, activations, total.
    ``skip_layers``: checkpointed settings' last layers that keep their activations (``off`` keeps all)."""
    h, n = model.hidden, step.tokens
    head = model.vocab * h  # one of embed_tokens / lm_head
    if step.adapter is None:
        trained, frozen_bytes = model.projection_params() + model.other_params(), 0.0
        head_trained = True
    else:
        saved_modules = [m for m in step.modules_to_save if m in ("embed_tokens", "lm_head")]
        heads_trained = min(len(saved_modules), 1) if model.tied else len(saved_modules)  # tied: one matrix
        trained = lora_params(model, step) + head * heads_trained
        base = NF4_BYTES if step.adapter == "qlora" else 2
        frozen_bytes = base * model.projection_params() + 2 * model.other_params()  # trained copies keep originals
        head_trained = "lm_head" in saved_modules or (model.tied and heads_trained > 0)
    state = OPTIMIZER_STATE_BYTES.get(step.optimizer, 8)
    kahan = step.adapter is None and step.master_weights == "bf16_kahan"
    trained_bytes = 2 if kahan else 4  # each trained weight and its gradient
    state += 2 if kahan else 0  # the compensation buffer is optimizer state
    s = model.saved_bytes_per_token()
    kept = model.layers if setting == "off" else min(max(skip_layers, 1), model.layers)  # layers keeping their S
    checkpointed = model.layers - kept
    inputs = {"off": 0, "on": checkpointed, "offload": min(OFFLOAD_RESIDENT_INPUTS, checkpointed)}[setting] * 2 * h
    stored = inputs + kept * s
    in_backward = BACKWARD_LAYER_FACTOR * s
    others = stored - s if kept else stored  # backward starts in the last layer: a kept one's S is in_backward
    activations = max(n * (others + in_backward), n * stored + min(n, CE_CHUNK_ROWS) * model.vocab * 4)
    gradients = trained_bytes * trained
    weights = int(frozen_bytes + trained_bytes * trained
                  + (2 * (model.projection_params() + model.other_params()) if step.frozen_reference else 0))
    optimizer = state * trained
    working = max(activations + (4 * head if head_trained else 0), gradients + n * in_backward)
    parts = {"weights": weights, "optimizer": optimizer, "gradients": gradients, "activations": int(activations)}
    return {**parts, "total": int(weights + optimizer + working + STEP_OVERHEAD)}


def fits(predicted: int, free: int) -> bool:
    return predicted * (1 + RESERVE_SHARE) + RESERVE_BYTES <= free


def choose(predicted: dict[Mode, int], free: int,
           candidates: Sequence[Mode] = FASTEST_FIRST) -> tuple[Mode, bool]:
    """The fastest of ``candidates`` whose predicted peak fits in ``free`` bytes, and True; if none
    fits, the leanest (the last) and False."""
    for setting in candidates:
        if fits(predicted[setting], free):
            return setting, True
    return candidates[-1], False


def most_skipped_layers(model: ModelShape, step: StepShape, free: int) -> int:
    """The most last layers that may keep their activations under checkpointing ``on`` in ``free`` bytes."""
    for skip in range(model.layers - 1, 1, -1):
        if fits(predict_peak(model, step, "on", skip)["total"], free):
            return skip
    return 0  # the last layer alone, which on never checkpoints


def auto_record(model: ModelShape, step: StepShape, free: int,
                candidates: Sequence[Mode] = FASTEST_FIRST) -> dict[str, Any]:
    """``auto``'s choice for a step on a GPU with ``free`` bytes, with the figures it used (train_info.json):
    the fastest setting that fits, and under ``on`` as many last layers kept out of checkpointing as fit."""
    predicted = {s: predict_peak(model, step, s)["total"] for s in FASTEST_FIRST}
    setting, ok = choose(predicted, free, candidates)
    record = {"requested": "auto", "setting": setting, "free_gib": round(free / GIB, 3),
              "tokens_per_micro_batch": step.tokens,
              "predicted_peak_gib": {s: round(b / GIB, 3) for s, b in predicted.items()},
              "reserve": f"{RESERVE_BYTES / GIB:g} GiB + {RESERVE_SHARE:.0%} of the prediction"}
    skip = most_skipped_layers(model, step, free) if ok and setting == "on" else 0
    if skip:
        record["skip_layers"] = skip
        record["predicted_peak_gib"][f"on, last {skip} layers kept"] = round(
            predict_peak(model, step, "on", skip)["total"] / GIB, 3)
    if ok:
        log.info("gradient_checkpointing auto: %s%s (predicted peak %.1f GiB of %.1f GiB free; off %.1f, on %.1f, "
                 "offload %.1f)", setting, f" but for the last {skip} of {model.layers} layers" if skip else "",
                 predict_peak(model, step, setting, skip)["total"] / GIB, free / GIB,
                 *(predicted[s] / GIB for s in FASTEST_FIRST))
    else:
        need = predicted[setting] * (1 + RESERVE_SHARE) + RESERVE_BYTES
        record["shortfall_gib"] = round((need - free) / GIB, 3)
        log.warning("gradient_checkpointing auto: no setting fits; training with %s, predicted to need %.1f GiB "
                    "(with the reserve) of %.1f GiB free, %.1f GiB short: lower micro_batch_size or sequence_len%s",
                    setting, need / GIB, free / GIB, (need - free) / GIB,
                    ", or use adapter: qlora" if step.adapter == "lora" else "")
    return record


def checkpoint_setting(run: RunConfig) -> Mode | Literal["auto"]:
    """The setting ``gradient_checkpointing`` (with ``activation_offloading``) asks for."""
    asked = run.gradient_checkpointing
    if asked in ("auto", "offload"):
        return asked
    if not asked:
        return "off"
    return "offload" if run.activation_offloading else "on"


def build_setting(run: RunConfig) -> Mode:
    """The setting an engine builds its model with: :func:`resolve_checkpointing` has replaced ``auto``
    before make_engine builds one; a model built directly (tests, benchmarks) takes ``auto`` as off."""
    asked = checkpoint_setting(run)
    return "off" if asked == "auto" else asked


def resolve_checkpointing(run: RunConfig, model_path: Path, device: torch.device,
                          engine: str) -> tuple[RunConfig, dict[str, Any]]:
    """``run`` with ``gradient_checkpointing`` decided for ``engine`` (the model's: triton, torch, fsdp or
    deepspeed) on ``device``, and the decision as train_info.json records it. ``auto``: off on the CPU
    (checkpointing saves GPU memory only); the memory model's choice on a GPU with the triton engine
    (with ``activation_offloading: true`` it checkpoints only with offload); on on the other engines'
    GPUs, which the model does not cover."""
    asked = checkpoint_setting(run)
    record: dict[str, Any] = {"requested": asked}
    skip = run.gradient_checkpointing_skip_layers
    if asked != "auto":
        setting: Mode = asked
    elif device.type != "cuda":
        setting, record["reason"] = "off", "no CUDA GPU: checkpointing saves GPU memory only"
    elif engine != "triton":
        setting = "on"
        record["reason"] = f"no measured memory model for the {engine} engine: checkpointing on, its leanest"
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=run.trust_remote_code)
        step = StepShape(run.micro_batch_size * run.sequence_len, run.adapter, run.lora_r,
                         tuple(run.lora_target_modules), tuple(run.lora_modules_to_save), run.optimizer,
                         frozen_reference=run.adapter is None and run.compares_with_reference,
                         master_weights=run.master_weights)
        free = torch.cuda.mem_get_info(device)[0]
        record = auto_record(ModelShape.from_config(config), step, free,
                             ("off", "offload") if run.activation_offloading else FASTEST_FIRST)
        setting, skip = record["setting"], record.get("skip_layers", 0)
    if setting == "offload" and engine != "triton":
        setting, record["reason"] = "on", f"offload is the triton engine's; the {engine} engine checkpoints on the GPU"
    record["setting"] = setting
    skip = skip if setting != "off" else 0
    if skip:
        record["skip_layers"] = skip
    value = {"off": False, "on": True, "offload": "offload"}[setting]
    return dataclasses.replace(run, gradient_checkpointing=value, activation_offloading=setting == "offload",
                               gradient_checkpointing_skip_layers=skip), record


# The shapes scripts/bench_train.py measures (vocab 128256 for all).
LLAMA_8B = ModelShape(hidden=4096, intermediate=14336, layers=32, q_dim=4096, kv_dim=1024, vocab=128256, tied=False)
LLAMA_1B = ModelShape(hidden=2048, intermediate=8192, layers=16, q_dim=2048, kv_dim=512, vocab=128256, tied=True)
PHI3_MINI = ModelShape(hidden=3072, intermediate=8192, layers=32, q_dim=3072, kv_dim=3072, vocab=128256, tied=False)
MOE_8X = ModelShape(hidden=2048, intermediate=4096, layers=16, q_dim=2048, kv_dim=512, vocab=128256, tied=False,
                    experts=8, active_experts=2)
# (row, model, adapter, tokens, setting, measured peak GiB): one H200, torch 2.11, triton 3.6, LoRA r=16 on the
# seven projections, fused AdamW, rows of 4096 tokens unless said.
CALIBRATION: tuple[tuple[str, ModelShape, StepShape, Mode, float], ...] = tuple(
    (row, model, StepShape(tokens, adapter), setting, gib) for row, model, adapter, tokens, setting, gib in (
        # BENCHMARKS.md "Training: single GPU"
        ("ours_lora 8B x4", LLAMA_8B, "lora", 16384, "on", 21.89),
        ("ours_lora_offload 8B x4", LLAMA_8B, "lora", 16384, "offload", 18.29),
        ("ours_qlora 8B x4", LLAMA_8B, "qlora", 16384, "on", 12.46),
        ("ours_lora 8B x1", LLAMA_8B, "lora", 4096, "on", 17.09),
        ("ours_lora 1B x4", LLAMA_1B, "lora", 16384, "on", 4.79),
        ("ours_lora 1B x8", LLAMA_1B, "lora", 32768, "on", 7.08),
        ("ours_qlora_long 8B, 65,536 tokens", LLAMA_8B, "qlora", 65536, "on", 31.3),
        ("ours_qlora_long 8B, 131,072 tokens", LLAMA_8B, "qlora", 131072, "on", 56.9),
        ("ours_qlora_long 8B, 262,144 tokens", LLAMA_8B, "qlora", 262144, "on", 108.0),
        # BENCHMARKS.md "Other architectures" (batch 2)
        ("ours_lora phi3-mini x2", PHI3_MINI, "lora", 8192, "on", 10.92),
        ("ours_lora moe-8x x2", MOE_8X, "lora", 8192, "on", 9.93),
        # BENCHMARKS.md "Full fine-tuning" (1B, every weight trained)
        ("ours 1B full x4", LLAMA_1B, None, 16384, "on", 19.85),
        ("ours_nockpt 1B full x4", LLAMA_1B, None, 16384, "off", 30.07),
        # notes/gpu-peers.md (2026-11-30)
        ("tunedag, no checkpointing 8B x4", LLAMA_8B, "lora", 16384, "off", 70.5),
        ("tunedag QLoRA offloaded, 131,072 tokens", LLAMA_8B, "qlora", 131072, "offload", 27.2),
    ))
