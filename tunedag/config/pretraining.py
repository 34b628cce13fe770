"""Axolotl's ``pretraining_dataset``: a hub corpus streamed for ``max_steps`` steps, as a tunedag dataset entry.

Axolotl streams the first entry's split (``load_dataset(path, name, split=split, streaming=True)``),
tokenizes each document with an end-of-sequence token after it, packs documents into
``sequence_len`` rows (each attending only within itself) and trains on every token for exactly
``max_steps`` steps (it refuses the key without ``max_steps``: the stream has no length). In tunedag
the entry becomes one ``datasets`` entry: the hub split streamed by the download stage only as far
as the run reads it (``max_words``, see tunedag.data.streaming), tokenized as Axolotl's type says
(``pretrain``: a document longer than ``sequence_len`` cut into overlapping windows, each ending in
an end-of-sequence token; ``completion``: cut into consecutive pieces), every token trained,
documents packed with attention kept within each, and trained for ``max_steps`` steps, the loop
starting the data over if the steps outlast it.

The bound: one optimizer step trains ``micro_batch_size × gradient_accumulation_steps`` rows of
``sequence_len`` tokens on each GPU, so ``max_steps`` steps train T = max_steps × micro_batch_size ×
gradient_accumulation_steps × sequence_len tokens on one GPU. Rows whose text holds T words hold at
least T tokens (a word is at least one token), about 1.3 T for English text. An entry that sets
``max_words`` or ``max_rows`` itself keeps its own (on N GPUs, N × T words give each its own data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunedag.config.fields import ConfigError, RunConfig

KEY = "pretraining_dataset"
TYPES = {"pretrain": "text_column", "completion": "field"}  # Axolotl's types here, and each one's text key


def _setting(raw: dict[str, Any], key: str) -> Any:
    """A run's value of ``key``, or tunedag's default (what the run trains with)."""
    value = raw.get(key)
    return RunConfig.__dataclass_fields__[key].default if value is None else value


def token_budget(raw: dict[str, Any]) -> int | None:
    """Tokens ``max_steps`` steps train on one GPU; None where a setting is not a positive integer
    (the key's own check names it)."""
    values = [_setting(raw, k) for k in ("max_steps", "micro_batch_size", "gradient_accumulation_steps",
                                          "sequence_len")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    total = 1
    for v in values:
        total *= v
    return total


def pretraining_entry(raw: dict[str, Any], where: str, base_dir: Path, notes: list[str]) -> dict[str, Any]:
    """The tunedag ``datasets`` entry of the run's ``pretraining_dataset`` (see the module docstring)."""
    value, at = raw[KEY], f"{where}.{KEY}"
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, (str, dict)) for e in entries):
        raise ConfigError(f"{at}: expected a hub dataset id or a list of one {{path: ..., type: pretrain}} entry, "
                          f"got {value!r}")
    if len(entries) > 1:
        raise ConfigError(f"{at}: {len(entries)} entries, but Axolotl streams only the first and ignores the rest; "
                          "keep one")
    if raw.get("datasets"):
        raise ConfigError(f"{at}: set beside datasets, which Axolotl then does not train on; keep one of them")
    if not raw.get("max_steps"):
        raise ConfigError(f"{where}.max_steps: required with {KEY} (as in Axolotl): a streamed corpus has no "
                          "length, so max_steps says how much of it is read and trained on")
    if raw.get("sample_packing") is False:
        raise ConfigError(f"{where}.sample_packing: false with {KEY}: Axolotl then cuts each document at "
                          "sequence_len and drops the rest, which tunedag does not offer; set sample_packing: true")
    entry = {"path": entries[0]} if isinstance(entries[0], str) else dict(entries[0])
    kind = entry.pop("type", None) or "pretrain"
    if kind not in TYPES:
        raise ConfigError(f"{at}[0].type: {kind!r}: tunedag streams raw text as type pretrain or completion")
    text = entry.pop(TYPES[kind], None)
    if TYPES[kind] == "text_column" and entry.get("field") is not None:
        raise ConfigError(f"{at}[0].field: type: pretrain reads its text from text_column (default text)")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{at}[0].path: expected a hub dataset id, got {path!r}")
    if not path.startswith("hf:") and (base_dir / path).is_file():  # a folder streams as datasets reads one
        raise ConfigError(f"{at}[0].path: {path!r} is a local file; {KEY} streams a hub dataset (or a folder "
                          "of data files), and a local text file trains as datasets: [{path: ..., type: completion}]")
    entry.update(type=kind, field=text, path=path if path.startswith("hf:") else f"hf:{path}")
    if entry.get("max_words") is None and entry.get("max_rows") is None:
        budget = token_budget(raw)
        if budget is None:
            return entry  # a bad max_steps, micro_batch_size, ... is named by its own check
        entry["max_words"] = budget
        split = "".join(f"{mark}{entry[k]}" for mark, k in ((":", "name"), ("@", "split")) if entry.get(k))
        notes.append(f"{at}: the download stage streams {entry['path']}{split} and keeps its first rows holding "
                     f"{budget:,} words (max_steps × micro_batch_size × gradient_accumulation_steps × sequence_len, "
                     "at least that many tokens: one GPU's share; on N GPUs set max_words: N × that in the entry); "
                     f"documents train as type: {kind}, packed")
    return entry
