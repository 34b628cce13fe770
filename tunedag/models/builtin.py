"""Built-in models (``base_model: builtin:<name>``): tiny, random, and fully local.

A built-in model is a deterministic random initialisation of a real architecture with a real
byte-level BPE tokenizer trained here, saved as an ordinary Hugging Face folder, so every stage
runs with no network and no GPU exactly as it would on a hub model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunedag.builtin_models import BUILTIN_MODELS
from tunedag.data.sample_task import INSTRUCTION, WORDS
from tunedag.io import atomic_path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")

_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "### Response:\n{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _tokenizer_corpus() -> list[str]:
    """A fixed corpus: the built-in task's words and the prompt template, plus plain text."""
    template = ["### Instruction:", "### Input:", "### Response:", INSTRUCTION,
                "Below is an instruction that describes a task. Write a response that completes it."]
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    prose = ("The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and "
             "punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / \\ # @ & * + = < > % $ are here.")
    return template * 20 + sentences * 20 + [prose] * 20


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 pre-tokenization) on the fixed corpus; BOS is prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=_CHAT_TEMPLATE,
                                   model_max_length=2048)


def materialize_builtin(name: str, dest: Path) -> Path:
    """Write built-in model ``name`` as an HF folder at ``dest`` (atomically: temp dir, rename)."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}")
    spec = dict(BUILTIN_MODELS[name])
    vocab, seed = spec.pop("tokenizer_vocab"), spec.pop("seed")
    tokenizer = build_tokenizer(vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    with atomic_path(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunedag_builtin.json").write_text(json.dumps({"name": name, **BUILTIN_MODELS[name]}))
    return dest
