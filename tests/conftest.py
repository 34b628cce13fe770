"""Test-session setup shared by every test folder.

Triton decides at decoration time whether kernels run on the CPU interpreter, so
TRITON_INTERPRET must be set before any kernel module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama, materialised once per test session."""
    from tunedag.models.builtin import materialize_builtin

    return materialize_builtin("tiny-llama", tmp_path_factory.mktemp("models") / "tiny-llama")
