"""The torch engine and the training loop: packed masking, accumulation, checkpoints, resume."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunedag.config import DatasetConfig
from tunedag.data.download import download_dataset
from tunedag.data.shards import ShardReader
from tests.helpers import tokenize_with_model as tokenize_run
from tunedag.models.loading import load_causal_lm
from tunedag.data.batches import collate, trained_token_count
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.train.checkpoint import list_checkpoints
from tunedag.train.loop import train
from tests.helpers import sample_rows, tiny_run, write_jsonl


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("packed")
    src = write_jsonl(root / "src.jsonl", sample_rows(240))
    download_dataset(DatasetConfig(path=str(src)), root / "raw")
    run = tiny_run(src, learning_rate=5e-3, lora_modules_to_save=["lm_head"], save_steps=3, sequence_len=256)
    tokenize_run(run, [root / "raw"], tiny_model_dir, root / "packed")
    return run, root / "packed"


def test_packed_row_loss_equals_its_samples_alone(packed, tiny_model_dir):
    """Honouring sample boundaries, a packed row's summed loss is the sum of its samples' losses."""
    _, shards = packed
    model = load_causal_lm(tiny_model_dir).eval()
    row = ShardReader(shards / "train").row(0)
    bounds = list(zip(row["cu_seqlens"], row["cu_seqlens"][1:]))
    assert len(bounds) > 1
    with torch.no_grad():
        batch = collate([row], pad_id=0)
        packed_loss = loss_sum(model(**model_inputs(batch, torch.device("cpu"), torch.float32)).logits, batch["labels"])
        alone = []
        for a, b in bounds:
            ids = torch.from_numpy(row["input_ids"][a:b].astype("int64"))[None]
            labels = torch.from_numpy(row["labels"][a:b].astype("int64"))[None]
            alone.append(loss_sum(model(input_ids=ids).logits, labels))
    torch.testing.assert_close(packed_loss, sum(alone), rtol=1e-5, atol=1e-5)
    # the mask matters: attending across samples changes the loss well beyond that tolerance
    with torch.no_grad():
        leaky = loss_sum(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, batch["labels"])
    assert abs(float(leaky - packed_loss)) > 1e-3


def test_padding_does_not_change_the_loss(packed, tiny_model_dir):
    _, shards = packed
    model = load_causal_lm(tiny_model_dir).eval()
    reader = ShardReader(shards / "train")
    rows = [reader.row(i) for i in range(3)]
    with torch.no_grad():
        together = collate(rows, pad_id=0)
        joint = loss_sum(model(**model_inputs(together, torch.device("cpu"), torch.float32)).logits, together["labels"])
        single = sum(loss_sum(model(**model_inputs(b, torch.device("cpu"), torch.float32)).logits, b["labels"])
                     for b in (collate([r], 0) for r in rows))
    assert trained_token_count(together["labels"]) == sum(trained_token_count(collate([r], 0)["labels"]) for r in rows)
    torch.testing.assert_close(joint, single, rtol=1e-5, atol=1e-5)


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_training_lowers_the_loss_and_writes_its_outputs(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    run = dataclasses.replace(run, max_steps=12)
    info = train(run, shards, tiny_model_dir, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run/train_metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert lines[-1]["loss"] < 0.7 * lines[0]["loss"]
    assert info["steps"] == 12 and info["config_hash"] == run.stage_hash("train")
    assert (tmp_path / "run/adapter/adapter_config.json").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run/checkpoints")] == ["step-9", "step-12"]


def test_gradient_accumulation_matches_one_larger_batch(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    big = dataclasses.replace(run, micro_batch_size=4, gradient_accumulation_steps=1, max_steps=3, max_grad_norm=0.0)
    small = dataclasses.replace(big, micro_batch_size=2, gradient_accumulation_steps=2)
    train(big, shards, tiny_model_dir, tmp_path / "big")
    train(small, shards, tiny_model_dir, tmp_path / "small")
    # the step's loss is the mean over all its trained tokens, however it is split (a mean of
    # per-micro-batch means would differ: the micro-batches hold different token counts)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / name / "train_metrics.jsonl").read_text().splitlines()]
              for name in ("big", "small")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "small")
    for name in a:
        # Adam divides by sqrt(v): fp32 summation order shows in near-zero gradients, up to
        # ~1e-3 of one lr-sized (5e-3) step
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)


class Killed(Exception):
    pass


def test_run_killed_mid_training_resumes_to_the_same_weights(packed, tiny_model_dir, tmp_path, monkeypatch):
    run, shards = packed
    run = dataclasses.replace(run, max_steps=7, save_steps=3, keep_last_checkpoints=5)
    train(run, shards, tiny_model_dir, tmp_path / "straight")

    from tunedag.train.engines import TorchEngine
    real_loss_sum, calls = TorchEngine.loss_sum, []

    def dies_in_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise Killed()
        return real_loss_sum(self, batch)

    monkeypatch.setattr(TorchEngine, "loss_sum", dies_in_step_5)
    with pytest.raises(Killed):
        train(run, shards, tiny_model_dir, tmp_path / "resumed")
    assert not (tmp_path / "resumed/adapter").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed/checkpoints")] == ["step-3"]
    monkeypatch.setattr(TorchEngine, "loss_sum", real_loss_sum)
    info = train(run, shards, tiny_model_dir, tmp_path / "resumed")
    assert info["resumed_from"].endswith("step-3") and info["steps"] == 7
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed/train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_checkpoints_of_another_config_are_not_resumed(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    train(dataclasses.replace(run, max_steps=3), shards, tiny_model_dir, tmp_path / "r")
    info = train(dataclasses.replace(run, max_steps=3, learning_rate=1e-3), shards, tiny_model_dir, tmp_path / "r")
    assert info["resumed_from"] is None
