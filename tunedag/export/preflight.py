"""What the export stages would refuse, checked before any job starts.

The facts come from the exporters themselves, so a newly supported architecture is accepted
here the moment it is: `gguf_arch.resolve_arch` (the table `gguf_arch.ARCHITECTURES`, torch-free)
and `model_facts.GGUF_QUANTIZER_TYPES`. This module is torch-free too, so the workflow calls it
while it reads the config (workflow/rules/export.smk), for every run whose base model's
config.json is readable then: built-in models, local folders, and hub models downloaded
already. Any other hub model is checked when the export stage starts, before it writes.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunedag.builtin_models import BUILTIN_MODELS
from tunedag.config import ConfigError, RunConfig
from tunedag.export.gguf_arch import resolve_arch
from tunedag.export.gguf_errors import GGUFExportError
from tunedag.model_facts import (BUILTIN_MODEL_TYPE, GGUF_QUANTIZER_TYPES, GGUF_WRITER_TYPES, LLAMA_CPP_PACKAGE,
                                 read_model_config)


def quantizer_installed() -> bool:
    """Whether llama-cpp-python is importable here (looked up, not imported: it loads libllama)."""
    return importlib.util.find_spec("llama_cpp") is not None


def base_model_config(run: RunConfig, folder: Path) -> dict[str, Any] | None:
    """The base model's config.json as a dict where it is readable now (built-in, or ``folder``'s)."""
    if run.base_model.startswith("builtin:"):
        return {"model_type": BUILTIN_MODEL_TYPE, **BUILTIN_MODELS.get(run.base_model.removeprefix("builtin:"), {})}
    return read_model_config(folder)


def export_problems(run: RunConfig, model_config: dict[str, Any] | None, where: str, what: str,
                    quantizer: bool) -> list[str]:
    """One line per export of ``run`` that would fail, naming it and what to do instead.

    ``model_config``: the base model's config.json (None: not readable yet); ``what`` names it;
    ``quantizer``: whether llama-cpp-python is installed where the export runs.
    """
    if run.trains_classifier or not run.gguf_types:  # a reward model gets no GGUF (export.smk)
        return []
    problems = []
    needs = [t for t in run.gguf_types if t in GGUF_QUANTIZER_TYPES]
    if needs and not quantizer:
        problems.append(f"{where}.gguf_types: {', '.join(needs)} are made by llama.cpp's quantizer, which needs the "
                        f"{LLAMA_CPP_PACKAGE} package, not installed here; install it (pip install 'tunedag[export]') "
                        f"or keep to {', '.join(GGUF_WRITER_TYPES)}, which tunedag writes itself")
    if model_config is not None:
        try:
            resolve_arch(model_config)
        except GGUFExportError as err:
            problems.append(f"{where}.gguf_types: {err} ({what}); drop the GGUF export (gguf_types: []): the vLLM "
                            "export still serves the model")
    return problems


def check_exports(run: RunConfig, model_config: dict[str, Any] | None, where: str, what: str,
                  quantizer: bool) -> None:
    """Raise a ConfigError with every line of `export_problems`."""
    problems = export_problems(run, model_config, where, what, quantizer)
    if problems:
        raise ConfigError(*problems)
