"""Held-out loss during training (eval_steps, evals_per_epoch) and early stopping on it."""
import dataclasses
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tunedag.config import ConfigError, DatasetConfig, load_run
from tunedag.data.batches import collate, trained_token_count
from tunedag.data.download import download_dataset
from tunedag.data.shards import ShardReader
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.models.loading import load_causal_lm
from tunedag.train.checkpoint import latest_checkpoint, resume_key
from tunedag.train.held_out import Evaluation, eval_interval
from tunedag.train.loop import _resume_point, train
from tunedag.train.ranks import DistEnv
from tests.helpers import preference_rows, sample_rows, tiny_run, tokenize_with_model, tokenized_pairs, write_jsonl
from tests.train.ranks import metrics, torchrun_train, write_runs

VAL_ROWS = 9  # odd, so 2 ranks get 5 and 4 rows: with eval_batch_size 4 one rank repeats a batch it drops
FLAT_LR = 1e-30  # the LoRA B matrices leave zero, but the model's outputs stay the same fp32 values


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval-packed")
    src = write_jsonl(root / "src.jsonl", sample_rows(120))
    download_dataset(DatasetConfig(path=str(src)), root / "raw")
    run = tiny_run(src, val_set_size=VAL_ROWS, eval_batch_size=4)
    tokenize_with_model(run, [root / "raw"], tiny_model_dir, root / "packed")
    return run, root / "packed"


def test_schedule():
    assert eval_interval(None, None, 10) is None and eval_interval(3, None, 10) == 3
    assert eval_interval(None, 3, 10) == 3 and eval_interval(None, 4, 2) == 1
    every_3 = Evaluation(3, None, None, last_step=10)
    assert [s for s in range(1, 11) if every_3.due(s)] == [3, 6, 9, 10]
    assert not any(Evaluation(None, None, None, last_step=10).due(s) for s in range(1, 11))


@pytest.mark.parametrize("keys, message", [
    ({"eval_steps": 2, "evals_per_epoch": 3}, r"runs\.t\.eval_steps and evals_per_epoch: both set"),
    ({"early_stopping_patience": 2}, r"runs\.t\.early_stopping_patience: needs evaluations to count"),
    ({"eval_steps": 0}, r"runs\.t\.eval_steps: must be at least 1"),
])
def test_bad_eval_settings_are_refused_naming_the_key(keys, message, packed):
    run, _ = packed
    with pytest.raises(ConfigError, match=message):
        tiny_run(run.datasets[0].path, **keys)


def _held_out_mean(model_dir, adapter_dir, val_dir) -> tuple[float, int]:
    """The mean next-token loss of every val row alone under the adapter, in eval mode."""
    model = PeftModel.from_pretrained(load_causal_lm(model_dir), adapter_dir).eval()
    reader = ShardReader(val_dir)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(reader.num_rows):
            batch = collate([reader.row(i)], pad_id=0)
            total += float(loss_sum(model(**model_inputs(batch, torch.device("cpu"), torch.float32)).logits,
                                    batch["labels"]))
            tokens += trained_token_count(batch["labels"])
    return total / tokens, tokens


def test_eval_loss_at_its_steps_is_the_mean_held_out_loss(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    # dropout on: the held-out loss must be computed in eval mode to match the plain forward below
    run = dataclasses.replace(run, max_steps=3, eval_steps=2, learning_rate=5e-3, lora_dropout=0.3)
    info = train(run, shards, tiny_model_dir, tmp_path / "run")
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 3]  # every 2 steps, and the last
    expected, tokens = _held_out_mean(tiny_model_dir, tmp_path / "run/adapter", shards / "val")
    assert tokens >= VAL_ROWS and lines[-1]["eval_tokens"] == tokens
    assert lines[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert lines[1]["eval_loss"] > lines[-1]["eval_loss"] + 0.05  # training moved it: the last step's weights
    assert info["best_eval_loss"] == pytest.approx(expected, rel=1e-5) and info["best_eval_step"] == 3
    assert not info["stopped_early"] and info["adapter_step"] == 3


def _adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_early_stopping_on_a_flat_loss_keeps_the_best_adapter(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    run = dataclasses.replace(run, max_steps=20, eval_steps=1, early_stopping_patience=2, learning_rate=FLAT_LR,
                              save_steps=1, keep_last_checkpoints=5)
    info = train(run, shards, tiny_model_dir, tmp_path / "stopped")
    lines = metrics(tmp_path / "stopped")
    # step 1 is the best; steps 2 and 3 do not improve on it (equal is not lower): patience 2 runs out at 3
    assert [m["step"] for m in lines] == [1, 2, 3] and len({m["eval_loss"] for m in lines}) == 1
    assert info["stopped_early"] and info["steps"] == 3
    assert info["best_eval_step"] == 1 and info["adapter_step"] == 1
    # the run's adapter holds step 1's weights (as its checkpoint does), not the last step's
    best = _adapter(tmp_path / "stopped/adapter")
    first, last = (_adapter(tmp_path / f"stopped/checkpoints/step-{s}") for s in (1, 3))
    assert best.keys() == first.keys()
    assert all(torch.equal(best[k], first[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_resume_keeps_the_patience_count(packed, tiny_model_dir, tmp_path):
    run, shards = packed
    run = dataclasses.replace(run, max_steps=20, eval_steps=1, early_stopping_patience=3, learning_rate=FLAT_LR,
                              save_steps=5)
    polls = []

    def stop_after_step_2():
        polls.append(1)
        return len(polls) == 2

    assert train(run, shards, tiny_model_dir, tmp_path / "r", should_stop=stop_after_step_2) is None
    info = train(run, shards, tiny_model_dir, tmp_path / "r")
    # best at step 1, one evaluation without improvement before the stop: the resumed run stops at
    # step 4 as an uninterrupted one does (a forgotten count would stop at step 6)
    assert info["resumed_from"].endswith("step-2")
    assert info["stopped_early"] and info["steps"] == 4 and info["best_eval_step"] == 1
    assert [m["step"] for m in metrics(tmp_path / "r") if "eval_loss" in m] == [1, 2, 3, 4]
    # a run stopped early is finished: running the stage again trains again from step 0
    manifest = json.loads((shards / "manifest.json").read_text())
    key = resume_key(run.stage_hash("train"), manifest, tiny_model_dir)
    assert latest_checkpoint(tmp_path / "r/checkpoints", key, 20).name == "step-4"
    assert _resume_point(tmp_path / "r/checkpoints", key, 20, DistEnv()) is None


def test_dpo_eval_loss_is_the_mean_over_val_pairs(tiny_model_dir, tmp_path):
    """With the policy still the reference (a flat step), every pair's DPO loss is log 2."""
    run, shards = tokenized_pairs(tmp_path / "data", tiny_model_dir, preference_rows(60, seed=4), val_set_size=6,
                                  lora_modules_to_save=[])
    run = dataclasses.replace(run, max_steps=1, eval_steps=1, learning_rate=FLAT_LR)
    train(run, shards, tiny_model_dir, tmp_path / "run")
    (line,) = metrics(tmp_path / "run")
    assert line["eval_tokens"] == 6  # pairs, not tokens
    assert line["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_give_the_eval_loss_of_one(engine, packed, tiny_model_dir, tmp_path):
    """2 gloo ranks: each evaluates its share of the 9 val rows (FSDP, as ZeRO-3, gathers weights in every
    forward, so the rank a row short runs a batch it drops), the sums are added."""
    run, shards = packed
    common = {"max_steps": 2, "eval_steps": 1, "eval_batch_size": 4, "val_set_size": VAL_ROWS}
    config = write_runs(tmp_path / "config.yaml", run.datasets[0].path, {
        engine: {"train_engine": engine, "micro_batch_size": 2, **common},
        "single": {"micro_batch_size": 4, **common}})
    torchrun_train(config, engine, shards, tiny_model_dir, tmp_path / engine)
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    ranks, single = metrics(tmp_path / engine), metrics(tmp_path / "single")
    assert [m["eval_tokens"] for m in ranks] == [m["eval_tokens"] for m in single]
    # fp32 sums in another order: a few ulps of a loss near 5
    assert [m["eval_loss"] for m in ranks] == pytest.approx([m["eval_loss"] for m in single], rel=1e-5)
    assert json.loads((tmp_path / engine / "train_info.json").read_text())["world_size"] == 2
