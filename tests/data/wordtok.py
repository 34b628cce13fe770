"""A word-level tokenizer whose ids can be written by hand: ``VOCAB[i]`` has id ``i``.

Whitespace pre-tokenization (``\\w+|[^\\w\\s]+``): "### Response:\\n" is ``###``, ``Response``, ``:``;
newlines and spaces vanish. The special tokens are matched before pre-tokenization.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]", "###", "Instruction", ":", "Input",
         "Response", "user", "assistant", "system", "hi", "hello", "bye", "ok", "be", "nice", "good", "bad",
         "x", "y", "z", "a", "b", "c"]
ID = {w: i for i, w in enumerate(VOCAB)}
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def word_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]", chat_template=chat_template)


def save_word_tokenizer(path: Path, chat_template: str | None = None) -> Path:
    word_tokenizer(chat_template).save_pretrained(path)
    return path


def ids(text: str) -> list[int]:
    """Hand tokenization of space-separated words (for building expectations)."""
    return [ID[w] for w in text.split()]
