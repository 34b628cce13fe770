"""Tiny HF model folders for the GGUF export tests: random weights, local tokenizers.

Weights are initialised with std 0.3 (initializer_range) instead of 0.02: at 0.02
the logits are nearly uniform and a missing Q/K permutation moves them by only
~6e-3, while at 0.3 it changes them by ~10 and flips the argmax.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Text the tokenizers are trained on: words, digits, punctuation, whitespace runs, non-ASCII.
_WORDS = (
    "the quick brown fox jumps over lazy dog hello world model export file token llama gemma qwen "
    "mistral weights layer norm rope cache isn't we'll they're 2024 12345 3.14 café naïve 日本 ☃"
).split()


def corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", "! "]
    return ["".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)]


LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K_REGEX = (  # gpt-oss's (tiktoken's o200k)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def save_bpe_tokenizer(out: Path, pre: str = "gpt2", vocab_size: int = 400) -> int:
    """A byte-level BPE tokenizer like tunedag's built-in one; returns its size.

    pre: "gpt2" (ByteLevel's built-in regex, as the built-in model uses), "llama3",
    "qwen2" or "o200k" (a Split regex followed by ByteLevel without regex, as those
    families ship it).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=(pre == "llama3")))
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "o200k": O200K_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    add_bos = pre != "qwen2"  # Qwen tokenizers add no BOS: cover both settings
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return tok.get_vocab_size()


def save_sentencepiece_tokenizer(out: Path, tokenizer_class: str = "LlamaTokenizer",
                                 add_dummy_prefix: bool = True, vocab_size: int = 400) -> int:
    """A SentencePiece BPE model with byte fallback (Llama-2/Mistral/Gemma style).

    Writes tokenizer.model and tokenizer_config.json, then lets transformers
    convert it and save tokenizer.json beside it, as a merged folder holds them.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
    }))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return vocab_size


@dataclass
class TinySpec:
    """One tiny model folder: architecture, tokenizer kind and config overrides."""

    name: str
    arch: str  # llama, mistral, qwen2, qwen3, gemma
    tokenizer: str  # gpt2, llama3, qwen2 (BPE pre-tokenizers) or sentencepiece
    config: dict[str, Any] = field(default_factory=dict)
    vocab_pad: int = 0  # config.vocab_size = tokenizer size + vocab_pad
    shard: bool = False  # save as several safetensors shards with an index


def _config(spec: TinySpec, vocab_size: int, bos: int, eos: int, pad: int | None):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "qwen3": Qwen3Config, "gemma": GemmaConfig}[spec.arch]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        initializer_range=0.3, rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    kwargs.update(spec.config)
    return cls(**kwargs)


def build_tiny_model(spec: TinySpec, out: Path) -> Path:
    """Write config, f32 safetensors, tokenizer and generation_config to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "sentencepiece":
        cls = "GemmaTokenizer" if spec.arch == "gemma" else "LlamaTokenizer"
        n_tok = save_sentencepiece_tokenizer(out, cls, add_dummy_prefix=spec.arch != "gemma")
    else:
        n_tok = save_bpe_tokenizer(out, spec.tokenizer)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids
    config = _config(spec, n_tok + spec.vocab_pad, ids("<s>"), ids("</s>"), tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # norms start at exactly 1 (gemma: 0); perturb so the norm convention shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out, max_shard_size="100KB" if spec.shard else "5GB")
    return out


# The models the tests export: every architecture, both tokenizer kinds, the
# config shapes that change the export (tied embeddings, biases, llama3 rope,
# padded vocab, sharded weights).
TINY_SPECS = {
    "llama": TinySpec("llama", "llama", "gpt2"),
    "llama3": TinySpec("llama3", "llama", "llama3", config=dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        shard=True),
    # Rows of 256 (QK_K) so llama-quantize really makes k-quants rather than falling back;
    # std 0.15 keeps the per-layer gain (std * sqrt(hidden)) that of the 64-wide models.
    "llama_wide": TinySpec("llama_wide", "llama", "gpt2", config=dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, initializer_range=0.15)),
    "mistral": TinySpec("mistral", "mistral", "sentencepiece", config=dict(sliding_window=None)),
    "qwen2": TinySpec("qwen2", "qwen2", "qwen2", config=dict(tie_word_embeddings=True), vocab_pad=24),
    "qwen3": TinySpec("qwen3", "qwen3", "qwen2"),
    # HF's Gemma tokenizer appends <pad> and <mask> after the SentencePiece pieces.
    "gemma": TinySpec("gemma", "gemma", "sentencepiece", vocab_pad=8),
}
