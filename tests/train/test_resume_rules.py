"""Which checkpoint a rerun of train resumes: only one written with the same config, data, base model
and code; never the end of a finished run; never one with a payload file gone or cut short."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_run
from tunedag.train import checkpoint as ckpt
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import train

ADAPTER = "adapter/adapter_model.safetensors"


class Killed(Exception):
    pass


def _killed_in_step(monkeypatch, step: int) -> None:
    """The next train call dies in optimizer step ``step`` (micro-batches: one a step)."""
    real, calls = TorchEngine.loss_sum, []

    def dies(self, batch):
        calls.append(1)
        if len(calls) == step:
            monkeypatch.setattr(TorchEngine, "loss_sum", real)
            raise Killed()
        return real(self, batch)

    monkeypatch.setattr(TorchEngine, "loss_sum", dies)


@pytest.fixture
def run(sample_shards):
    src, _ = sample_shards
    return tiny_run(src, max_steps=6, save_steps=2, keep_last_checkpoints=5)


def test_changed_shards_start_over_instead_of_resuming(run, sample_shards, tiny_model_dir, tmp_path, monkeypatch):
    _, shards = sample_shards
    _killed_in_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train(run, shards, tiny_model_dir, tmp_path / "r")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r/checkpoints")] == ["step-2", "step-4"]
    other = tmp_path / "other-shards"  # the same rows, tokenized for another manifest: other data
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "edited"}))
    info = train(run, other, tiny_model_dir, tmp_path / "r")
    assert info["resumed_from"] is None and info["steps"] == 6


def test_a_finished_run_trains_again_when_its_stage_reruns(run, sample_shards, tiny_model_dir, tmp_path, caplog):
    _, shards = sample_shards
    first = train(run, shards, tiny_model_dir, tmp_path / "r")
    before = (tmp_path / "r" / ADAPTER).read_bytes()
    (tmp_path / "r" / ADAPTER).unlink()
    with caplog.at_level("INFO", logger="tunedag.train.checkpoint"):
        again = train(run, shards, tiny_model_dir, tmp_path / "r")
    assert again["resumed_from"] is None and again["steps"] == first["steps"] == 6
    assert "the end of a finished run: training again from step 0" in caplog.text
    assert (tmp_path / "r" / ADAPTER).read_bytes() == before  # deterministic: the same weights


def test_a_checkpoint_with_a_payload_file_cut_short_gives_way_to_the_one_before(
        run, sample_shards, tiny_model_dir, tmp_path, monkeypatch, caplog):
    _, shards = sample_shards
    train(run, shards, tiny_model_dir, tmp_path / "straight")
    _killed_in_step(monkeypatch, 5)
    with pytest.raises(Killed):
        train(run, shards, tiny_model_dir, tmp_path / "r")
    broken = tmp_path / "r/checkpoints/step-4/adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="tunedag.train.checkpoint"):
        info = train(run, shards, tiny_model_dir, tmp_path / "r")
    assert "step-4: adapter_model.safetensors missing or cut short" in caplog.text
    assert info["resumed_from"].endswith("step-2")
    a, b = load_file(tmp_path / "straight" / ADAPTER), load_file(tmp_path / "r" / ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
