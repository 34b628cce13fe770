"""Tokenizer metadata (tokenizer.ggml.*) for the two tokenizer kinds llama.cpp runs.

- SentencePiece (``tokenizer.model`` present): GGUF tokenizer model ``llama``;
  pieces, scores (llama.cpp merges by score) and piece types come from the
  SentencePiece model itself. Used by Llama-2, Mistral v0.x, Gemma.
- Byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel step): GGUF
  tokenizer model ``gpt2`` plus merges and a pre-tokenizer name llama.cpp knows,
  chosen from the pre-tokenizer regex in tokenizer.json: GPT-2's built-in regex
  -> ``gpt-2``, Llama-3's -> ``llama-bpe``, Qwen2's -> ``qwen2``. llama.cpp rejects
  unknown names at load and silently tokenizes differently under a wrong one, so
  anything else is refused here.

Special token ids, add_bos/add_eos, merges and the chat template (the run's, else the one in
tokenizer_config.json or chat_template.jinja) go through `gguf.SpecialVocab`.
Ids between the tokenizer's size and config.vocab_size (padded embeddings) become
``[PAD{i}]`` tokens of type UNUSED, so token ids and embedding rows stay aligned.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from tunedag.export.gguf_errors import GGUFExportError

TT = gguf.TokenType

GPT2_REGEX_NAME = "gpt-2"
# Split patterns as they appear in tokenizer.json, keyed to llama.cpp's pre-tokenizer names.
SPLIT_REGEX_NAMES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # o200k (gpt-oss, GPT-4o)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}
KNOWN_PRE_TOKENIZERS = (
    "ByteLevel(use_regex=true) [GPT-2]",
    "Sequence[Split(Llama-3 regex), ByteLevel(use_regex=false)]",
    "Sequence[Split(Qwen2 regex), ByteLevel(use_regex=false)]",
    "Sequence[Split(o200k regex: gpt-oss), ByteLevel(use_regex=false)]",
)


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def bpe_pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json ``pre_tokenizer``."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_REGEX_NAME
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        name = SPLIT_REGEX_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise GGUFExportError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} is not one llama.cpp is known to reproduce; "
        f"supported: {'; '.join(KNOWN_PRE_TOKENIZERS)}"
    )


def _bpe_vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    tj = _load_json(model_dir / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"tokenizer.json has a {model.get('type')!r} model; the GGUF export handles byte-level BPE "
            "(tokenizer.json) and SentencePiece (tokenizer.model)"
        )
    if (tj.get("pre_tokenizer") or {}).get("type") == "Metaspace" or model.get("byte_fallback"):
        raise GGUFExportError(
            f"{model_dir / 'tokenizer.json'} is a SentencePiece-style tokenizer but tokenizer.model is missing: "
            "copy tokenizer.model from the base model into the folder"
        )
    pre_name = bpe_pre_tokenizer_name(tj.get("pre_tokenizer"))
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: TT.NORMAL for i in by_id}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TT.CONTROL if added.get("special") else TT.USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise GGUFExportError(
            f"tokenizer.json has token id {max(by_id)} but config.json vocab_size is {n_vocab}: "
            "resize the model's embeddings before exporting"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    toktypes = [types.get(i, TT.UNUSED) for i in range(n_vocab)]
    return tokens, toktypes, pre_name


def _added_tokens(model_dir: Path) -> list[dict[str, Any]]:
    added: list[dict[str, Any]] = []
    if (model_dir / "tokenizer.json").is_file():
        added += _load_json(model_dir / "tokenizer.json").get("added_tokens", [])
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = _load_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        added += [{**tok, "id": int(i)} for i, tok in decoder.items()]
    return added


def _sentencepiece_vocab(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int], bool, Any]:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise GGUFExportError(
            "tokenizer.model (SentencePiece) needs the sentencepiece package: pip install sentencepiece"
        ) from None
    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise GGUFExportError(
            f"tokenizer.model has {sp.vocab_size()} pieces but config.json vocab_size is {n_vocab}"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    toktypes = [int(TT.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i).encode("utf-8"), sp.get_score(i)
        toktypes[i] = (
            TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i)
            else TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL
        )
    # Tokens added on top of the SentencePiece model (chat markers, <pad>): transformers >= 5 lists
    # them in tokenizer.json's added_tokens, older versions in tokenizer_config.json.
    for added in _added_tokens(model_dir):
        i = int(added["id"])
        if i >= n_vocab:
            raise GGUFExportError(
                f"the tokenizer adds {added['content']!r} as id {i} but config.json vocab_size is {n_vocab}: "
                "resize the model's embeddings before exporting"
            )
        if i >= sp.vocab_size():
            tokens[i] = added["content"].encode("utf-8")
            toktypes[i] = TT.CONTROL if added.get("special") else TT.USER_DEFINED
            scores[i] = -1000.0
    # SentencePiece's dummy prefix shows as a leading "▁" on a single letter.
    add_space_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    return tokens, scores, toktypes, add_space_prefix, sp


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, chat_template: str | None = None) -> str:
    """Write tokenizer.ggml.* keys and tokenizer.chat_template (``chat_template``, else the folder's own);
    returns the tokenizer kind ("llama" or "gpt2")."""
    if (model_dir / "tokenizer.model").is_file():
        tokens, scores, toktypes, space_prefix, sp = _sentencepiece_vocab(model_dir, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(toktypes)
        writer.add_add_space_prefix(space_prefix)
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
        # The SentencePiece model's own ids fill whatever the json files leave unset.
        for typ, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())):
            if tid >= 0:
                special._set_special_token(typ, tid)
        special.add_special_token.setdefault("bos", True)  # HF LlamaTokenizer's default
        kind = "llama"
    elif (model_dir / "tokenizer.json").is_file():
        tokens_s, toktypes, pre_name = _bpe_vocab(model_dir, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_name)
        writer.add_token_list(tokens_s)
        writer.add_token_types(toktypes)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise GGUFExportError(f"{model_dir / 'tokenizer.json'} has no BPE merges; llama.cpp needs them")
        special.add_special_token.setdefault("bos", False)
        kind = "gpt2"
    else:
        raise GGUFExportError(
            f"no tokenizer in {model_dir}: tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece) "
            "is missing; copy it from the base model"
        )
    special.add_special_token.setdefault("eos", False)
    # llama.cpp reads only add_bos/add_eos; SpecialVocab may also parse sep from the template.
    special.add_special_token = {k: v for k, v in special.add_special_token.items() if k in ("bos", "eos")}
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return kind
