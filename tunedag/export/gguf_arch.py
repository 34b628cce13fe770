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

Rope: transformers >= 5 writes ``rope_parameters``; older configs write
``rope_theta`` / ``rope_scaling``. Both are read. Llama-3 scaling is expressed the
way llama.cpp expects it: a ``rope_freqs`` tensor of per-dimension divisors, and
no rope-scaling key (writing both would scale twice).
"""
from __future__ import annotations

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


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, True, 0.0, False, ("silu",)),
    "mistral": ArchSpec("mistral", gguf.MODEL_ARCH.LLAMA, True, 0.0, False, ("silu",)),
    "qwen2": ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, False, 0.0, False, ("silu",)),
    "qwen3": ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, False, 0.0, False, ("silu",)),
    # HF Gemma always uses the tanh approximation (gelu_pytorch_tanh), as llama.cpp does.
    "gemma": ArchSpec("gemma", gguf.MODEL_ARCH.GEMMA, False, 1.0, True, ("gelu_pytorch_tanh", "gelu")),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))
ROPE_TYPES = ("default", "linear", "llama3")


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
    if window and config.get("use_sliding_window", True) and window < hp.context_length:
        log.warning(
            "%s uses sliding-window attention (%d tokens); llama.cpp's %s graph attends to the full "
            "context, so outputs differ from transformers beyond %d tokens",
            spec.model_type, window, gguf.MODEL_ARCH_NAMES[spec.gguf_arch], window,
        )
    if spec.always_tied and not hp.tie_word_embeddings:
        raise GGUFExportError(
            f"{spec.model_type} with tie_word_embeddings=false cannot be exported: "
            "llama.cpp's graph for it reads the output projection from the token embeddings"
        )
    return hp


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
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
