"""A run's tokenizer: the base model's, with the run's ``special_tokens`` set and its ``tokens`` added.

Every stage that reads a run's tokenizer prepares it here (tokenize, train, merge, evaluate; the
exports read the merged folder, which holds the prepared tokenizer), so that token ids agree from
the packed shards to the GGUF. Axolotl's meaning:

- a special token the vocabulary holds becomes that role's token, with no new id (Llama 3's
  ``eos_token: <|eot_id|>``): the formats end samples with it, generation stops at it;
- one it lacks is added as a new special token (never split, not normalised), and so is each of
  ``additional_special_tokens``; ``tokens`` are added as plain tokens that are never split;
- a new token's id is past the vocabulary, so the model's embeddings and lm_head grow to
  ``len(tokenizer)`` where they load (tunedag.models.vocab). An adapter run trains only the rows of
  the modules in ``lora_modules_to_save``, so a new token needs embed_tokens and lm_head there; a new
  pad token alone does not, as padding is never trained. A reward model takes no new tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

from tokenizers import AddedToken

from tunedag.config import RunConfig
from tunedag.config.fields import SpecialTokens
from tunedag.errors import TunedagError

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerSetupError(TunedagError, ValueError):
    """The run's special_tokens or tokens cannot be trained as the run is set up: names the token and the fix."""


def _token(text: str) -> AddedToken:
    return AddedToken(text, rstrip=False, lstrip=False, normalized=False, special=True)


def prepare_tokenizer(tok: Any, special: SpecialTokens | None, tokens: Sequence[str]) -> list[str]:
    """Set ``special``'s roles and add ``tokens`` on the HF tokenizer ``tok`` (in place); return the tokens
    that were new to its vocabulary, in id order. Preparing a prepared tokenizer changes nothing."""
    before = len(tok)
    roles = {role: getattr(special, role) for role in ROLES if special and getattr(special, role) is not None}
    for role, text in roles.items():
        tok.add_special_tokens({role: _token(text)})
    if tokens:
        tok.add_tokens([AddedToken(t, rstrip=False, lstrip=False, normalized=False) for t in tokens])
    if special and special.additional_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": [_token(t) for t in special.additional_special_tokens]})
    if ("bos_token" in roles or "eos_token" in roles) and hasattr(tok, "update_post_processor"):
        tok.update_post_processor()  # a Llama tokenizer's own BOS/EOS insertion follows the new tokens
    return tok.convert_ids_to_tokens(list(range(before, len(tok))))


EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def check_new_tokens_train(new: Sequence[str], run: RunConfig, where: str) -> None:
    """Stop when ``new`` tokens would start from embedding rows that the run never trains."""
    if new and run.trains_classifier:
        raise TokenizerSetupError(f"{where}: special_tokens/tokens add {', '.join(map(repr, new))}, new to the "
                                  f"tokenizer; a reward model (rl: {run.rl}) keeps the vocabulary it has: choose "
                                  "tokens the vocabulary has")
    pad = run.special_tokens.pad_token if run.special_tokens else None
    trained = [t for t in new if t != pad]
    missing = [m for m in EMBEDDING_MODULES if m not in run.lora_modules_to_save]
    if trained and run.adapter is not None and missing:
        raise TokenizerSetupError(
            f"{where}: special_tokens/tokens add {', '.join(map(repr, trained))}, new to the tokenizer, whose "
            f"embedding rows start untrained; with adapter: {run.adapter} only lora_modules_to_save train in full: "
            f"set lora_modules_to_save: [{', '.join(EMBEDDING_MODULES)}] (Axolotl's rule too), or choose tokens "
            "the vocabulary has")


def prepare_run_tokenizer(tok: Any, run: RunConfig, where: str) -> Any:
    """``tok`` (the base model's, read from ``where``) prepared for ``run``; see the module docstring."""
    check_new_tokens_train(prepare_tokenizer(tok, run.special_tokens, run.tokens), run, where)
    return tok
