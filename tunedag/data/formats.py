"""Row formats (``datasets[].type``): a raw row becomes token ids and labels.

Labels are -100 wherever the loss must not look: prompt tokens (unless ``train_on_inputs``)
and always the first token of a sample, which nothing inside the sample predicts; that also
keeps a packed row's loss from reaching across a sample boundary after the shift.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from tunedag.errors import TunedagError

IGNORE_INDEX = -100


class RowFormatError(TunedagError, ValueError):
    """A row that does not fit its format: the caller adds the file and row number."""


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt for generation, with the answer it should produce."""

    text: str
    reference: str


def _field(row: dict[str, Any], name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowFormatError(f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RowFormatError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def alpaca_prompt(row: dict[str, Any]) -> Prompt:
    """The Alpaca layout: optional system line, instruction, optional input, response header."""
    instruction, extra = _field(row, "instruction"), _field(row, "input", required=False)
    system = _field(row, "system", required=False)
    text = f"{system}\n\n" if system else ""
    text += f"### Instruction:\n{instruction}\n\n"
    if extra:
        text += f"### Input:\n{extra}\n\n"
    return Prompt(text=text + "### Response:\n", reference=_field(row, "output"))


def _with_bos(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    return ids


def tokenize_alpaca(row: dict[str, Any], tok: PreTrainedTokenizerBase, train_on_inputs: bool) -> Sample:
    prompt = alpaca_prompt(row)
    prompt_ids = _with_bos(tok, prompt.text)
    answer_ids = tok(prompt.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    prompt_labels[0] = IGNORE_INDEX
    return Sample(prompt_ids + answer_ids, prompt_labels + answer_ids)


def tokenize_completion(row: dict[str, Any], tok: PreTrainedTokenizerBase, train_on_inputs: bool) -> Sample:
    ids = _with_bos(tok, _field(row, "text")) + [tok.eos_token_id]
    return Sample(ids, [IGNORE_INDEX] + ids[1:])


FORMATS: dict[str, Callable[[dict[str, Any], PreTrainedTokenizerBase, bool], Sample]] = {
    "alpaca": tokenize_alpaca,
    "completion": tokenize_completion,
}
PROMPTS: dict[str, Callable[[dict[str, Any]], Prompt]] = {"alpaca": alpaca_prompt}
