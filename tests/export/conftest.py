"""Fixtures for the export tests: tiny model folders and their GGUF exports, built once a session."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gguf_models import TINY_SPECS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_model(name) -> folder of the TINY_SPECS[name] model (built on first use)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(TINY_SPECS[name], root / name)
        return built[name]
    return get


@pytest.fixture(scope="session")
def exported(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """exported(name, outtype) -> GGUF file of that tiny model (exported on first use)."""
    from tunedag.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str) -> Path:
        if (name, outtype) not in done:
            done[name, outtype] = export_gguf(tiny_model(name), root / f"{name}-{outtype}.gguf", outtype).path
        return done[name, outtype]
    return get
