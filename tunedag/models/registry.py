"""Which architectures the triton engine covers, and which of their modules it replaces.

One entry per Hugging Face ``model_type``. Every covered architecture gets the same five
replacements (``REPLACED``), applied by :mod:`tunedag.models.patching` and recorded on the
model; what differs between architectures is data, not code paths:

| model_type | norm numerics | MLP activation | extras |
| --- | --- | --- | --- |
| llama (Llama 2/3.x, DeepSeek-R1-Distill-Llama) | Llama | SiLU | — |
| mistral | Llama | SiLU | sliding window (config.sliding_window) |
| qwen2 (and DeepSeek-R1-Distill-Qwen) | Llama | SiLU | q/k/v bias (frozen, added after the fused projection) |
| qwen3 | Llama | SiLU | per-head q/k RMSNorm |
| gemma | Gemma (1 + w) | GELU-tanh | embeddings scaled by sqrt(hidden) |
| gemma2 | Gemma (1 + w) | GELU-tanh | sandwich norms, attention and final logit softcapping, alternating sliding window |
| gemma3_text (Gemma3ForCausalLM) | Gemma (1 + w) | GELU-tanh | sandwich norms, Gemma q/k norms, sliding-window layers interleaved with global ones, one RoPE base per layer type |
| phi3 (Phi-3, Phi-4) | Llama | SiLU | packed ``qkv_proj`` and ``gate_up_proj`` (one LoRA each), sliding window from the config, partial rotary (Phi-4-mini: RoPE on the first 3/4 of each head) |
| mixtral | Llama | SiLU | sparse MoE (:mod:`tunedag.models.moe`): LoRA on every expert, grouped GEMMs, router loss |
| qwen3_moe | Llama | SiLU | per-head q/k RMSNorm; sparse MoE as Mixtral (top-k renormalised only with norm_topk_prob) |
| gpt_oss (gpt-oss-20b, -120b) | Llama | clamped SwiGLU (fixed) | attention sinks (``kernels/sink_attention.py``), q/k/v/o biases, alternating sliding window, half-width RoPE tables (YaRN); sparse MoE with a biased router, expert biases, interleaved gate/up |

Packed projections (Phi-3): peft puts one LoRA on the whole ``qkv_proj`` (A (r, H), B (q+k+v, r)) and
one on ``gate_up_proj``. That is exactly the fused kernels' three (two) projections sharing one A,
with B split by rows: the engine passes the same A and row slices of B and W, and autograd sums
the A gradients. The Llama names in ``lora_target_modules`` map onto the packed ones
(:func:`peft_targets`), so the default seven adapt every projection of a Phi-3 layer; on MoE
models gate/up/down name the experts' 3-D parameters (peft ``target_parameters``).

:func:`fast_path_blocker` names the first reason a run cannot take this path; the engine
then falls back to the torch engine and logs that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tunedag.config.fields import CLASSIFIER_OBJECTIVES
from tunedag.model_facts import LORA_TARGETS

# What the patching replaces, by role: (HF module, tunedag replacement)
REPLACED = {
    "rms_norm": ("*RMSNorm (decoder, final and Qwen3 q/k norms)", "kernels.rms_norm via FusedRMSNorm"),
    "rope": ("apply_rotary_pos_emb inside attention", "kernels.rope (in place on q, k)"),
    "attention": ("q/k/v/o LoRA Linears + attention", "kernels.lora_qkv / lora_o + packed attention"),
    "mlp": ("gate/up/down LoRA Linears + activation", "kernels.lora_mlp"),
    "loss": ("lm_head + cross-entropy over full logits", "kernels.cross_entropy (fused, chunked)"),
}
TRAINABLE_FULL_MODULES = ("embed_tokens", "lm_head")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one architecture maps onto the kernels."""

    model_type: str
    gemma_norm: bool = False  # RMSNorm scales by (1 + w) in fp32
    activation_key: str = "hidden_act"  # config attribute naming the MLP activation
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to their dtype
    final_softcap_key: str | None = None  # config attribute of the final logit softcap
    packed: bool = False  # q/k/v in one ``qkv_proj``, gate/up in one ``gate_up_proj`` (Phi-3)
    window_from_config: bool = False  # config.sliding_window applies to every layer (Mistral, Phi-3)
    rope_per_layer_type: bool = False  # rotary_emb(x, positions, layer_type): one RoPE base per layer type
    moe: bool = False  # sparse MoE blocks: experts as 3-D parameters, LoRA through peft's target_parameters
    moe_activation: str | None = None  # the experts' own fixed activation, whatever hidden_act says (gpt-oss)
    half_rope_tables: bool = False  # rotary_emb returns cos/sin of width D/2, shared by both halves (gpt-oss)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The projections (and expert parameters) the fused path adapts, by their names in this architecture."""
        modules, params = peft_targets(self, LORA_TARGETS)
        return modules + params


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama"),
    "mistral": ArchitectureSpec("mistral", window_from_config=True),
    "qwen2": ArchitectureSpec("qwen2"),
    "qwen3": ArchitectureSpec("qwen3", qk_norm=True),
    "gemma": ArchitectureSpec("gemma", gemma_norm=True, activation_key="hidden_activation", embed_scale=True),
    "gemma2": ArchitectureSpec("gemma2", gemma_norm=True, activation_key="hidden_activation", embed_scale=True,
                               final_softcap_key="final_logit_softcapping"),
    "gemma3_text": ArchitectureSpec("gemma3_text", gemma_norm=True, activation_key="hidden_activation",
                                    qk_norm=True, embed_scale=True, final_softcap_key="final_logit_softcapping",
                                    rope_per_layer_type=True),
    "phi3": ArchitectureSpec("phi3", packed=True, window_from_config=True),
    "mixtral": ArchitectureSpec("mixtral", window_from_config=True, moe=True),
    "qwen3_moe": ArchitectureSpec("qwen3_moe", qk_norm=True, moe=True),
    "gpt_oss": ArchitectureSpec("gpt_oss", moe=True, moe_activation="gpt_oss", half_rope_tables=True),
}
# packed projection -> the Llama projections it holds, in its row order
PACKED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# QLoRA holds these decoder projections in NF4 (the seven, and Phi-3's packed ones)
QUANTIZED_PROJECTIONS = LORA_TARGETS + tuple(PACKED_PROJECTIONS)
# MoE: the experts' 3-D parameters peft adapts (target_parameters), for the Llama MLP names
EXPERT_PARAMETERS = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _grouped(spec: ArchitectureSpec, names: Sequence[str], groups: dict[str, tuple[str, ...]]) -> list[str]:
    """Each complete group of ``names`` as its one target; part of a group is refused."""
    out = []
    for target, group in groups.items():
        given = [n for n in group if n in names]
        if given and len(given) < len(group):
            raise ValueError(f"lora_target_modules {given}: a {spec.model_type} model holds {list(group)} in one "
                             f"{target}, which LoRA adapts as a whole: name all of {list(group)}, or {target}")
        if given or target in names:
            out.append(target)
    return out


def peft_targets(spec: ArchitectureSpec | None, names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(target_modules, target_parameters) for peft from ``lora_target_modules`` in this architecture.

    Packed architectures: a complete group of Llama names (q_proj, k_proj, v_proj) becomes the packed
    projection. MoE: gate_proj, up_proj and down_proj become the experts' 3-D parameters.
    """
    if spec is None or not (spec.packed or spec.moe):
        return tuple(names), ()
    if spec.packed:
        rest = [n for n in names if not any(n in g for g in PACKED_PROJECTIONS.values()) and n not in PACKED_PROJECTIONS]
        return tuple(rest + _grouped(spec, names, PACKED_PROJECTIONS)), ()
    rest = [n for n in names if n not in MLP_NAMES and n not in EXPERT_PARAMETERS]
    return tuple(rest), tuple(_grouped(spec, names, EXPERT_PARAMETERS))


def lora_target_kwargs(config: Any, names: Sequence[str]) -> dict[str, list[str] | None]:
    """peft LoraConfig's ``target_modules`` and ``target_parameters`` for an HF ``config`` (unknown
    architectures take ``names`` unchanged)."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    modules, params = peft_targets(spec, names)
    return {"target_modules": list(modules), "target_parameters": list(params) or None}


def mlp_activation(spec: ArchitectureSpec, config: Any) -> str | None:
    """The kernel's activation name for this config, or None when the kernel lacks it."""
    if spec.moe_activation:
        return spec.moe_activation
    name = getattr(config, spec.activation_key, None) or getattr(config, "hidden_act", None)
    return ACTIVATIONS.get(name)


def fast_path_blocker(config: Any, *, rl: str | None, lora_dropout: float, lora_target_modules: Sequence[str],
                      lora_modules_to_save: Sequence[str]) -> str | None:
    """Why a run with these settings on a model with HF ``config`` cannot use the triton engine (None: it can)."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        return f"architecture {model_type!r} has no fused path (covered: {', '.join(ARCHITECTURES)})"
    if rl in CLASSIFIER_OBJECTIVES:
        return (f"rl: {rl} (reward modelling trains a score head on the torch engine; dpo, orpo and kto take "
                "this path)")
    if lora_dropout > 0:
        return f"lora_dropout {lora_dropout} > 0 (the fused LoRA kernels apply no dropout)"
    try:
        modules, params = peft_targets(spec, lora_target_modules)
    except ValueError as err:
        return str(err)
    if sorted(modules + params) != sorted(spec.lora_targets):
        return (f"lora_target_modules {list(lora_target_modules)} are not exactly the seven projections "
                f"{list(LORA_TARGETS)} that the fused QKV/O and MLP kernels adapt together")
    extra = [m for m in lora_modules_to_save if m not in TRAINABLE_FULL_MODULES]
    if extra:
        return f"lora_modules_to_save {extra}: only {list(TRAINABLE_FULL_MODULES)} are trained in full on the fused path"
    if lora_modules_to_save and getattr(config, "tie_word_embeddings", False):
        return "lora_modules_to_save with tied input/output embeddings (the fused path keeps them untied)"
    if mlp_activation(spec, config) is None:
        return f"MLP activation {getattr(config, spec.activation_key, None)!r} has no kernel"
    if getattr(config, "mlp_bias", False):
        return "bias on the MLP projections (the fused MLP kernel has none)"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout {config.attention_dropout} > 0"
    return _architecture_blocker(config)


def _architecture_blocker(config: Any) -> str | None:
    """Settings of the newer architectures that the fused path does not compute."""
    for key in ("resid_pdrop", "embd_pdrop"):  # Phi-3
        if getattr(config, key, 0.0):
            return f"{key} {getattr(config, key)} > 0 (the fused path applies no dropout)"
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention (the packed attention is causal)"
    if getattr(config, "router_jitter_noise", 0.0):
        return f"router_jitter_noise {config.router_jitter_noise} > 0 (the fused MoE routes without noise)"
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "dense MLP layers between the MoE layers (mlp_only_layers, decoder_sparse_step)"
    return None
