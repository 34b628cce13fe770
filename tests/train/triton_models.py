"""Tiny random-init models of every architecture the triton engine covers, and packed batches.

Shapes are the smallest that still exercise each feature (GQA, two layers, several documents per
row, padding): the Triton kernels run interpreted on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

from tunedag.data.formats import IGNORE_INDEX
from tunedag.data.batches import collate

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    # windows wider than any test document: the torch engine's 4-D packed mask has no window
    # (test_sliding_window_matches_hf checks windows against transformers' own mask)
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=64, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
}


def tiny_model(arch: str, dest: Path, seed: int = 0, **overrides) -> Path:
    """Write a random-init ``arch`` model to ``dest`` (fp32 safetensors) and return the folder."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).float()
    if arch.startswith("gemma"):  # Gemma norms start at 0 (scale 1 + w): make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def sample(length: int, rng: np.random.Generator, prompt: int = 3, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """One sample: ids, labels (prompt and first token not trained), positions from 0."""
    ids = rng.integers(3, vocab, size=length)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def pack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One packed row of ``samples``, as the tokenize stage writes it."""
    lengths = [len(s["input_ids"]) for s in samples]
    return {"input_ids": np.concatenate([s["input_ids"] for s in samples]),
            "labels": np.concatenate([s["labels"] for s in samples]),
            "position_ids": np.concatenate([np.arange(n) for n in lengths]),
            "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)])}


def packed_batch(seed: int = 0, rows: tuple[tuple[int, ...], ...] = ((4, 6), (5,))) -> dict[str, torch.Tensor]:
    """Rows of packed samples of the given lengths; the shorter row is padded."""
    rng = np.random.default_rng(seed)
    return collate([pack([sample(n, rng) for n in lengths]) for lengths in rows], pad_id=0)


def preference_batch(seed: int = 0, rows: tuple[tuple[int, ...], ...] = ((6, 5, 7, 4), (5, 8)),
                     labels: tuple[tuple[int, ...], ...] | None = None, prompt: int = 3,
                     vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Packed preference rows of segments of the given lengths (prompt masked), labelled chosen,
    rejected, … (dpo pairs: 1, 0, …) or by ``labels`` (kto: 1 desirable, 0 undesirable, per row)."""
    rng = np.random.default_rng(seed)
    out = []
    for r, lengths in enumerate(rows):
        row = pack([sample(n, rng, prompt, vocab) for n in lengths])
        row["segment_labels"] = np.array(labels[r] if labels else [1 - k % 2 for k in range(len(lengths))])
        out.append(row)
    return collate(out, pad_id=0)
