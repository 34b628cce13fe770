"""What config validation knows about a base model and vLLM before any job starts, as plain data.

Torch-free, so that :mod:`tunedag.config` can refuse a ``sequence_len`` longer than the model's
positions or a LoRA target the architecture lacks while the run is still a YAML file. The
model is read from its ``config.json`` as JSON (built-ins from their shapes); a hub model that
is not downloaded yet is checked by the tokenize stage, the first stage that reads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The seven projections of a Llama-family decoder layer: what LoRA adapts by default, and what
# the fused kernels of tunedag.models.registry adapt together.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Module leaf names per Hugging Face model_type, for the architectures tunedag knows; a model
# type not listed here is not checked before training (peft names what it lacks there).
LLAMA_FAMILY = frozenset(LORA_TARGETS + ("embed_tokens", "lm_head"))
# Phi-3 packs q/k/v and gate/up (the Llama names map onto them); MoE models hold the MLP names as experts.
MODULE_NAMES: dict[str, frozenset[str]] = {
    **{t: LLAMA_FAMILY for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral",
                                 "qwen3_moe", "gpt_oss")},
    "phi3": LLAMA_FAMILY | {"qkv_proj", "gate_up_proj"}}
# Every built-in model is a Llama (tunedag.models.builtin builds LlamaForCausalLM).
BUILTIN_MODEL_TYPE = "llama"

# vLLM's --max-lora-rank accepts these values; an adapter of another rank cannot be served.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Module names vLLM's LoRA layers wrap in Llama-family models, and the packed qkv / gate_up projections
# Phi-3 checkpoints hold (which vLLM's Phi-3 adapts as such).
VLLM_LORA_MODULES = frozenset(LORA_TARGETS + ("qkv_proj", "gate_up_proj", "embed_tokens", "lm_head"))

# config.json keys that hold the longest sequence a model was built for, by model family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def read_model_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict; None when there is none (a hub model not downloaded yet)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the model loader names a broken config.json with its own error
    return data if isinstance(data, dict) else None


def max_positions(model_config: dict[str, Any]) -> tuple[str, int] | None:
    """(key, value) of the model's position limit, or None when its config.json names none."""
    for key in POSITION_KEYS:
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def missing_modules(model_config: dict[str, Any], names: list[str]) -> list[str] | None:
    """The names (by their last dotted part) the architecture lacks; None when it is not known here."""
    known = MODULE_NAMES.get(str(model_config.get("model_type")))
    if known is None:
        return None
    return [n for n in names if n.rsplit(".", 1)[-1] not in known]


# GGUF output types (config key gguf_types). tunedag's own writer makes the first four
# (tunedag.export.gguf_tensors); the rest are made from a 16-bit GGUF by llama.cpp's quantizer,
# called through llama-cpp-python. Left out: the i-quants below 4 bits and q2_k_s, which llama.cpp
# refuses without an importance matrix, and the ternary tq1_0/tq2_0, for ternary-trained models only.
GGUF_WRITER_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                        "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
GGUF_TYPES = GGUF_WRITER_TYPES + GGUF_QUANTIZER_TYPES
# The Python package whose llama.cpp build quantizes (and measures the files' perplexity).
LLAMA_CPP_PACKAGE = "llama-cpp-python"
