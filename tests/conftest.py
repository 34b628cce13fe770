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


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, tiny_model_dir):
    """(alpaca source file, packed shards) of 240 rows of the built-in task."""
    from tunedag.config import DatasetConfig
    from tunedag.data.download import download_dataset
    from tests.helpers import sample_rows, tiny_run, tokenize_with_model, write_jsonl

    root = tmp_path_factory.mktemp("sample-shards")
    src = write_jsonl(root / "src.jsonl", sample_rows(240))
    download_dataset(DatasetConfig(path=str(src)), root / "raw")
    tokenize_with_model(tiny_run(src), [root / "raw"], tiny_model_dir, root / "packed")
    return src, root / "packed"
