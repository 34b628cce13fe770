"""The chat template a run's model was trained with, for every export to carry.

A run with chat-type data (sharegpt, chat_template, dpo, kto) was tokenized with the template
its ``chat_template`` key chose (a named one, its own Jinja, or the tokenizer's), which need not
be the one in the merged folder's tokenizer files (those are the base model's). The exports write
this template into the GGUF metadata, the vLLM folder and the Modelfile, so that all three
render a conversation as training did. A run without chat data keeps the folder's own template.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunedag.config import RunConfig
from tunedag.data.chat import resolve_template
from tunedag.data.formats import CHAT_TYPES


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def folder_chat_template(model_dir: Path) -> str | None:
    """The tokenizer's template: chat_template.jinja (transformers >= 4.50), else tokenizer_config.json's
    ``chat_template`` (a string, or named templates of which "default" is the chat one)."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = _tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def eos_text(model_dir: Path) -> str | None:
    """The tokenizer's EOS token as text (tokenizer_config.json, else special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token") if path.is_file() else None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def run_chat_template(run: RunConfig, model_dir: Path, base_dir: Path = Path(".")) -> str | None:
    """The template ``run`` trained with (see the module docstring); None when there is none."""
    own = folder_chat_template(model_dir)
    if not any(ds.type in CHAT_TYPES for ds in run.datasets):
        return own
    return resolve_template(run.chat_template, run.chat_template_jinja, own, base_dir)
