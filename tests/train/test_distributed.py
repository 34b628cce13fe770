"""The multi-rank loop on 2 CPU ranks (gloo, started by torchrun) against one process: ddp and fsdp
on supervised data, and a DPO run (its loss is a mean over pairs, counted over both ranks)."""
import importlib.util
import json

import pytest

from tunedag.config import ConfigError, load_run
from tunedag.train.loop import train
from tests.helpers import preference_rows, tiny_run, tokenized_pairs
from tests.train.ranks import assert_matches_one_process, torchrun_train, write_runs


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(engine, sample_shards, tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 2 x 2 accumulation = 1 process x micro-batch 4 x 2: same rows per step."""
    src, shards = sample_shards
    steps = {"max_steps": 4, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5}
    config = write_runs(tmp_path / "config.yaml", src, {engine: {"train_engine": engine, "micro_batch_size": 2,
                                                                 **steps},
                                                        "single": {"micro_batch_size": 4, **steps}})
    torchrun_train(config, engine, shards, tiny_model_dir, tmp_path / engine)
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    info = json.loads((tmp_path / engine / "train_info.json").read_text())
    assert info["engine"] == engine and info["world_size"] == 2 and info["steps"] == 4
    assert_matches_one_process(tmp_path / engine, tmp_path / "single")


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"))])
def test_dpo_on_two_ranks_matches_one_process(engine, tiny_model_dir, tmp_path):
    run, shards = tokenized_pairs(tmp_path / "data", tiny_model_dir, preference_rows(160, seed=4))
    dpo = {"datasets": [{"path": run.datasets[0].path, "type": "dpo"}], "rl": "dpo", "max_steps": 3,
           "lora_modules_to_save": []}
    config = write_runs(tmp_path / "config.yaml", tmp_path / "unused", {
        engine: {**dpo, "train_engine": engine, "micro_batch_size": 2},
        "single": {**dpo, "micro_batch_size": 4}})
    torchrun_train(config, engine, shards, tiny_model_dir, tmp_path / engine)
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    assert_matches_one_process(tmp_path / engine, tmp_path / "single")


@pytest.mark.parametrize("engine, stage", [("fsdp", 2), ("deepspeed", 3)])
def test_rl_is_refused_where_its_loss_cannot_run(engine, stage, sample_shards):
    src, _ = sample_shards
    with pytest.raises(ConfigError, match=f"rl: dpo does not run on {engine}"):
        tiny_run(src, datasets=[{"path": str(src), "type": "dpo"}], rl="dpo", train_engine=engine,
                 deepspeed_zero_stage=stage)
