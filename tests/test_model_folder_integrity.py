"""A base model folder with a weight file missing, cut short, overwritten or not safetensors stops the
stage that reads it, naming the file and the fix, before any work is done."""
from __future__ import annotations

import json
import shutil

import pytest

from tunedag.models.loading import ModelSourceError, check_weight_files, load_causal_lm


def _cut(path):
    path.write_bytes(path.read_bytes()[:-10])


def _grow(path):
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _garbage(path):
    path.write_bytes(b"not a safetensors file at all")


def _index_names_a_missing_file(folder):
    weights = next(folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                        "model.norm.weight": weights.name}}))


def _no_weights(folder):
    for weights in folder.glob("*.safetensors"):
        weights.unlink()


CASES = {
    "cut short": (lambda f: _cut(next(f.glob("*.safetensors"))), "bytes where its header places"),
    "grown": (lambda f: _grow(next(f.glob("*.safetensors"))), "cut short or overwritten"),
    "garbage": (lambda f: _garbage(next(f.glob("*.safetensors"))), "not a safetensors file"),
    "index names a missing file": (_index_names_a_missing_file, "model-00002-of-00002.safetensors: missing"),
    "no weights": (_no_weights, "no .safetensors weights"),
}


def test_an_intact_folder_passes(tiny_model_dir):
    check_weight_files(tiny_model_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_model_folder_is_named_before_loading(case, tiny_model_dir, tmp_path):
    damage, message = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ModelSourceError, match=message) as err:
        load_causal_lm(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
