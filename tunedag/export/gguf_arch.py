"""Architectures the GGUF export supports and the hyperparameters llama.cpp reads.

One `ArchSpec` per Hugging Face `model_type` says which llama.cpp graph runs the
model and which weight transforms it needs:

- llama, mistral -> GGUF arch ``llama``. llama.cpp rotates *interleaved* pairs
  (x0, x1), (x2, x3)... while HF rotates halves (x_i, x_{i+d/2}), so Q and K rows
  are permuted (see `gguf_tensors.permute_rope_rows`).
- qwen2, qwen3, gemma -> llama.cpp runs these with NEOX-style rope, the same
  rotate-half layout as HF: no permutation.
- gemma -> RMSNorm computes ``x * (1 + w)`` in HF; llama.cpp computes ``x * w``, so
  every norm weight is stored shifted by +1. The embedding scale sqrt(hidden) is
  applied inside llama.cpp's gemma graph, so embeddings are written unchanged.
  llama.cpp's gemma graph always reads the output projection from token_embd.
- gemma3_text -> ``gemma3``: Gemma's norm shift (q/k norms too), sliding-window layers. llama.cpp
  fixes what transformers configures: every 6th layer global, the others sliding with RoPE base
  10000, attention scale 1/sqrt(head_dim); a config that differs is refused rather than exported
  into a file that computes something else.
- phi3 -> ``phi3``: packed ``qkv_proj`` and ``gate_up_proj`` are llama.cpp's own ``attn_qkv`` and
  ``ffn_up`` ([gate; up], split by its SwiGLU); NEOX rope; LongRoPE (Phi-3.5, Phi-4-mini) as
  ``rope_factors_{short,long}`` tensors, the cos/sin attention factor and the original context; llama.cpp runs it without the sliding
  window (seen: a window written into the file changes nothing), so the window is warned about, as Mistral's.
- mixtral -> ``llama`` with experts, qwen3_moe -> ``qwen3moe``: the checkpoint's per-expert weights
  are stacked into (experts, out, in) ``ffn_{gate,up,down}_exps`` tensors; the router is
  ``ffn_gate_inp``; softmax gating, the top-k weights renormalised (a config that does not is refused).
- gpt_oss -> ``gpt-oss``: attention sinks (``attn_sinks``), q/k/v/o and router biases, NEOX rope with
  YaRN, sliding-window layers alternating with global ones from layer 0 (llama.cpp's fixed pattern),
  experts stacked as the checkpoint holds them and split by ``gguf_tensors`` (HF's (E, in, out) layout
  transposed; gate and up from the interleaved columns of ``gate_up_proj``, biases alike). llama.cpp
  fixes the clamped SwiGLU's alpha 1.702 and limit 7.0 and YaRN's ramp; a config that differs is refused.

Rope: transformers >= 5 writes ``rope_parameters``; older configs write
``rope_theta`` / ``rope_scaling``. Both are read. Llama-3 scaling is expressed the
way llama.cpp expects it: a ``rope_freqs`` tensor of per-dimension divisors, and
no rope-scaling key (writing both would scale twice).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tunedag.export.gguf_errors import GGUFExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How one HF model_type maps onto a llama.cpp architecture."""

    model_type: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # HF rotate-half -> GGML interleaved pairs
    norm_shift: float  # added to every ``*norm.weight`` (gemma: +1)
    always_tied: bool  # the llama.cpp graph has no separate output.weight
    activations: tuple[str, ...]  # hidden_act values the llama.cpp graph computes
    moe: bool = False  # experts: expert count, used count, their FFN width and weight normalisation
    sliding_window: bool = False  # the graph reads {arch}.attention.sliding_window


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, True, 0.0, False, ("silu",)),
    "mistral": ArchSpec("mistral", gguf.MODEL_ARCH.LLAMA, True, 0.0, False, ("silu",)),
    "qwen2": ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, False, 0.0, False, ("silu",)),
    "qwen3": ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, False, 0.0, False, ("silu",)),
    # HF Gemma always uses the tanh approximation (gelu_pytorch_tanh), as llama.cpp does.
    "gemma": ArchSpec("gemma", gguf.MODEL_ARCH.GEMMA, False, 1.0, True, ("gelu_pytorch_tanh", "gelu")),
    "gemma3_text": ArchSpec("gemma3_text", gguf.MODEL_ARCH.GEMMA3, False, 1.0, True, ("gelu_pytorch_tanh",),
                            sliding_window=True),
    "phi3": ArchSpec("phi3", gguf.MODEL_ARCH.PHI3, False, 0.0, False, ("silu",)),
    "mixtral": ArchSpec("mixtral", gguf.MODEL_ARCH.LLAMA, True, 0.0, False, ("silu",), moe=True),
    "qwen3_moe": ArchSpec("qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE, False, 0.0, False, ("silu",), moe=True),
    # hidden_act names nothing gpt-oss computes (its experts' SwiGLU is fixed): checked by _check_gpt_oss
    "gpt_oss": ArchSpec("gpt_oss", gguf.MODEL_ARCH.GPT_OSS, False, 0.0, False, ("silu",), moe=True,
                        sliding_window=True),
}
GEMMA3_SWA_EVERY = 6  # llama.cpp's gemma3 graph: layers 5, 11, ... global, the others sliding
GEMMA3_SWA_ROPE_THETA = 10000.0
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
# What llama.cpp's gpt-oss graph fixes, by config.json key: the experts' clamped SwiGLU and YaRN's ramp
GPT_OSS_FIXED = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
GPT_OSS_YARN = {"beta_fast": 32.0, "beta_slow": 1.0}


@dataclass(frozen=True)
class HParams:
    """The config.json values the GGUF header needs, under one set of names."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain rope
    vocab_size: int
    tie_word_embeddings: bool
    rope_dim: int = 0  # rotated dimensions of a head (Phi-3's partial_rotary_factor); 0: head_dim
    sliding_window: int | None = None  # written where the graph reads it (ArchSpec.sliding_window)
    n_experts: int = 0  # MoE: experts per layer (0: dense)
    n_experts_used: int = 0
    expert_ff: int = 0  # one expert's FFN width
    expert_norm: bool = False  # the top-k weights renormalised to sum 1


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{path} is missing: the GGUF export needs the merged model's config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_arch(config: dict[str, Any]) -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        named = f"{model_type!r}" + (f" ({', '.join(config['architectures'])})" if config.get("architectures") else "")
        raise GGUFExportError(
            f"GGUF export does not support architecture {named}; "
            f"supported model_type values: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    spec = ARCHITECTURES[model_type]
    if spec.gguf_arch == gguf.MODEL_ARCH.GPT_OSS:
        _check_gpt_oss(config)
    act = config.get("hidden_activation") or config.get("hidden_act")
    if act is not None and act not in spec.activations:
        raise GGUFExportError(
            f"{model_type} with hidden_act={act!r} cannot be exported: llama.cpp's "
            f"{spec.gguf_arch.name.lower()} graph computes {' / '.join(spec.activations)} only"
        )
    return spec


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if not isinstance(params, dict):  # transformers < 5
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise GGUFExportError(
            f"rope scaling type {rope_type!r} in config.json is not supported by the GGUF export; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    return theta, (None if rope_type == "default" else {**params, "rope_type": rope_type})


def read_hparams(config: dict[str, Any], spec: ArchSpec) -> HParams:
    try:
        hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        theta, scaling = _rope_settings(config)
        hp = HParams(
            n_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or hidden // n_head),
            context_length=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", spec.always_tied)),
        )
    except KeyError as e:
        raise GGUFExportError(f"config.json has no {e.args[0]!r}, which the GGUF header needs") from None
    window = config.get("sliding_window")
    if spec.sliding_window and window:
        hp = dataclasses.replace(hp, sliding_window=int(window))
    elif window and config.get("use_sliding_window", True) and window < hp.context_length:
        log.warning(
            "%s uses sliding-window attention (%d tokens); llama.cpp's %s graph attends to the full "
            "context, so outputs differ from transformers beyond %d tokens",
            spec.model_type, window, gguf.MODEL_ARCH_NAMES[spec.gguf_arch], window,
        )
    hp = dataclasses.replace(hp, rope_dim=int(hp.head_dim * _partial_rotary(config)), **_experts(config, spec))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "longrope" and spec.gguf_arch != gguf.MODEL_ARCH.PHI3:
        raise GGUFExportError(f"{spec.model_type} with longrope scaling cannot be exported: llama.cpp reads "
                              "LongRoPE factors for phi3 only")
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "yarn":
        _check_yarn(spec, hp.rope_scaling)
    if spec.gguf_arch == gguf.MODEL_ARCH.GEMMA3:
        _check_gemma3(config, hp)
    if spec.always_tied and not hp.tie_word_embeddings:
        raise GGUFExportError(
            f"{spec.model_type} with tie_word_embeddings=false cannot be exported: "
            "llama.cpp's graph for it reads the output projection from the token embeddings"
        )
    return hp


def _partial_rotary(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    return float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)


def _experts(config: dict[str, Any], spec: ArchSpec) -> dict[str, Any]:
    if not spec.moe:
        return {}
    n = config.get("num_local_experts") or config.get("num_experts")
    if not n or "num_experts_per_tok" not in config:
        raise GGUFExportError(f"{spec.model_type} config.json names no expert count (num_local_experts / "
                              "num_experts) or num_experts_per_tok")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise GGUFExportError(f"{spec.model_type} with dense layers between the MoE layers (mlp_only_layers, "
                              "decoder_sparse_step) cannot be exported: llama.cpp's graph has experts in every layer")
    if not config.get("norm_topk_prob", True):  # Mixtral has no such key: it always renormalises
        raise GGUFExportError(f"{spec.model_type} with norm_topk_prob=false cannot be exported: llama.cpp's graph "
                              "renormalises the top-k expert weights (seen: it ignores expert_weights_norm=false)")
    return dict(n_experts=int(n), n_experts_used=int(config["num_experts_per_tok"]),
                expert_ff=int(config.get("moe_intermediate_size") or config["intermediate_size"]), expert_norm=True)


def _check_gemma3(config: dict[str, Any], hp: HParams) -> None:
    """What llama.cpp's gemma3 graph fixes must be what the config says."""
    want = ["full_attention" if (i + 1) % GEMMA3_SWA_EVERY == 0 else "sliding_attention" for i in range(hp.n_layers)]
    problems = []
    if config.get("layer_types", want) != want:
        problems.append(f"layer_types {config['layer_types']} (llama.cpp: every {GEMMA3_SWA_EVERY}th layer global)")
    local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    if float(local.get("rope_theta", GEMMA3_SWA_ROPE_THETA)) != GEMMA3_SWA_ROPE_THETA:
        problems.append(f"sliding layers' rope_theta {local['rope_theta']} (llama.cpp: {GEMMA3_SWA_ROPE_THETA})")
    if float(config.get("query_pre_attn_scalar", hp.head_dim)) != hp.head_dim:
        problems.append(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} != head_dim {hp.head_dim}")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            problems.append(f"{key} {config[key]}")
    if problems:
        raise GGUFExportError("gemma3 with " + "; ".join(problems) + " cannot be exported: llama.cpp's gemma3 "
                              "graph would compute a different model")


def _check_gpt_oss(config: dict[str, Any]) -> None:
    """What llama.cpp's gpt-oss graph fixes must be what the config says (torch-free: the config check runs it)."""
    problems = [f"{key} {config[key]} (llama.cpp: {want})" for key, want in GPT_OSS_FIXED.items()
                if key in config and float(config[key]) != want]
    n = int(config.get("num_hidden_layers") or 0)
    want_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if config.get("layer_types", want_types) != want_types:
        problems.append(f"layer_types {config['layer_types']} (llama.cpp: sliding from layer 0, then every other)")
    if not config.get("sliding_window"):
        problems.append("no sliding_window (llama.cpp's graph needs the sliding layers' window)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        problems += [f"yarn {key} {rope[key]} (llama.cpp: {want})" for key, want in GPT_OSS_YARN.items()
                     if key in rope and float(rope[key]) != want]
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                problems.append(f"yarn {key} {rope[key]} (llama.cpp derives the attention factor from the factor)")
    if problems:
        raise GGUFExportError("gpt_oss with " + "; ".join(problems) + " cannot be exported: llama.cpp's gpt-oss "
                              "graph would compute a different model")


def _check_yarn(spec: ArchSpec, scaling: dict[str, Any]) -> None:
    if spec.gguf_arch != gguf.MODEL_ARCH.GPT_OSS:
        raise GGUFExportError(f"{spec.model_type} with yarn rope scaling cannot be exported: its ramp is checked "
                              "against llama.cpp for gpt_oss only")
    if scaling.get("truncate", True) is False:
        log.warning(
            "%s: config.json's yarn sets truncate=false; llama.cpp rounds YaRN's correction range out to whole "
            "dimensions (transformers' truncate=true), so the GGUF's rope frequencies between the two bounds "
            "differ slightly from transformers' (as in gpt-oss GGUFs from llama.cpp's own converter)",
            spec.model_type)


def longrope_factors(hp: HParams) -> dict[str, np.ndarray]:
    """LongRoPE's per-frequency divisors, (rope_dim/2,) f32 each, by the GGUF tensor they become: llama.cpp
    uses the long ones when its context exceeds the original one, as transformers does past that length."""
    s = hp.rope_scaling or {}
    names = {"short_factor": gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "long_factor": gguf.MODEL_TENSOR.ROPE_FACTORS_LONG}
    out = {}
    for key, tensor in names.items():
        factors = np.asarray(s[key], dtype=np.float32)
        if factors.shape != ((hp.rope_dim or hp.head_dim) // 2,):
            raise GGUFExportError(f"longrope {key} has {factors.size} values, the rotated head needs "
                                  f"{(hp.rope_dim or hp.head_dim) // 2}")
        out[gguf.TENSOR_NAMES[tensor] + ".weight"] = factors
    return out


def longrope_attention_factor(hp: HParams) -> float:
    """The factor transformers multiplies cos and sin by (its default when the config names none)."""
    s = hp.rope_scaling or {}
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    original = float(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or hp.context_length / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency divisors for Llama-3 rope scaling, shape (head_dim/2,), f32.

    llama.cpp computes theta_i = pos * base^(-2i/d) / rope_freqs[i]; HF's llama3
    rope keeps high frequencies, divides low ones by `factor`, and blends between.
    """
    s = hp.rope_scaling or {}
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def add_hparams(writer: gguf.GGUFWriter, hp: HParams, file_type: int, name: str) -> None:
    """Write general.* and {arch}.* keys."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.rope_dim or hp.head_dim)
    if hp.sliding_window:
        writer.add_sliding_window(hp.sliding_window)
    if hp.n_experts:
        writer.add_expert_count(hp.n_experts)
        writer.add_expert_used_count(hp.n_experts_used)
        writer.add_expert_feed_forward_length(hp.expert_ff)
        writer.add_expert_weights_norm(hp.expert_norm)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(hp))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope_scaling["original_max_position_embeddings"]))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope_scaling["original_max_position_embeddings"]))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
