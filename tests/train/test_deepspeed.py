"""train_engine: deepspeed on 2 CPU ranks (gloo, started by torchrun): ZeRO-2 and ZeRO-3 against one
process, resume from a DeepSpeed checkpoint, the generated and the user's DeepSpeed JSON."""
import json
import shutil

import pytest
import torch

from tunedag.config import ConfigError, load_run
from tunedag.deepspeed_json import DeepSpeedConfigError
from tunedag.train.checkpoint import list_checkpoints
from tunedag.train.loop import train
from tests.helpers import tiny_run
from tests.train.ranks import adapter, assert_matches_one_process, metrics, torchrun_train, write_runs

pytest.importorskip("deepspeed")
from tunedag.train.deepspeed_engine import deepspeed_config  # noqa: E402  (needs deepspeed's extra)


def test_zero2_on_two_ranks_matches_one_process(sample_shards, tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 4 = 1 process x micro-batch 8: the same rows per step, the same token mean."""
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {
        "ds": {"train_engine": "deepspeed", "deepspeed_zero_stage": 2, "max_steps": 4, "max_grad_norm": 0.5},
        "single": {"max_steps": 4, "micro_batch_size": 8, "max_grad_norm": 0.5}})
    torchrun_train(config, "ds", shards, tiny_model_dir, tmp_path / "ds")
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    info = json.loads((tmp_path / "ds/train_info.json").read_text())
    assert info["engine"] == "deepspeed" and info["world_size"] == 2 and info["steps"] == 4
    assert_matches_one_process(tmp_path / "ds", tmp_path / "single")
    assert max(m["grad_norm"] for m in metrics(tmp_path / "ds")) > 0.5  # clipping took part
    written = json.loads((tmp_path / "ds/deepspeed_config.json").read_text())
    assert written["zero_optimization"] == {"stage": 2}
    assert (written["train_micro_batch_size_per_gpu"], written["gradient_accumulation_steps"],
            written["train_batch_size"], written["gradient_clipping"]) == (4, 1, 8, 0.5)
    assert written["bf16"] == {"enabled": False} and written["managed_gradient_accumulation"] is False


def test_zero3_with_accumulation_matches_one_process_and_resumes_to_the_same_weights(
        sample_shards, tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 2 x 2 accumulation = 1 process x micro-batch 4 x 2; then resume from step 4."""
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {
        "ds": {"train_engine": "deepspeed", "deepspeed_zero_stage": 3, "max_steps": 6, "micro_batch_size": 2,
               "gradient_accumulation_steps": 2, "save_steps": 2, "keep_last_checkpoints": 2},
        "single": {"max_steps": 6, "micro_batch_size": 4, "gradient_accumulation_steps": 2}})
    run_dir = tmp_path / "ds"
    torchrun_train(config, "ds", shards, tiny_model_dir, run_dir)
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    assert_matches_one_process(run_dir, tmp_path / "single")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-4", "step-6"]  # keep_last_checkpoints: 2
    assert not list((run_dir / "checkpoints").glob(".*partial"))
    assert (checkpoints[-1] / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # one partition per rank

    # the job was stopped after step 4: its later checkpoint and its outputs never appeared
    straight = adapter(run_dir)
    shutil.rmtree(checkpoints[-1])
    for out in ("adapter", "train_info.json", "train_metrics.jsonl"):
        shutil.rmtree(run_dir / out) if (run_dir / out).is_dir() else (run_dir / out).unlink()
    log = torchrun_train(config, "ds", shards, tiny_model_dir, run_dir)
    assert f"resuming from {run_dir / 'checkpoints/step-4'}" in log
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 7))
    resumed = adapter(run_dir)
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


# --------------------------------------------------------------------------- the DeepSpeed JSON

def test_generated_config_follows_config_yaml(sample_shards):
    src, _ = sample_shards
    run = tiny_run(src, train_engine="deepspeed", deepspeed_zero_stage=3, deepspeed_offload="all",
                   micro_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.0)
    config = deepspeed_config(run, world_size=8, cuda=True, hidden_size=64)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 3, 48, 0.0)
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                           "offload_param": {"device": "cpu", "pin_memory": True}}
    on_cpu = deepspeed_config(tiny_run(src, train_engine="deepspeed", deepspeed_offload="optimizer"), 2, cuda=False,
                             hidden_size=64)
    assert on_cpu["bf16"] == {"enabled": False}
    assert on_cpu["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_a_user_json_replaces_the_generated_one_and_gets_tunedags_keys(sample_shards, tmp_path):
    src, _ = sample_shards
    user = {"zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_max_live_parameters": 1e8},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "bf16": {"enabled": True}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    run = tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path), gradient_accumulation_steps=2)
    config = deepspeed_config(run, world_size=4, cuda=False, hidden_size=64)
    assert config["zero_optimization"] == user["zero_optimization"] and config["bf16"] == {"enabled": True}
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 32)


def test_a_stock_json_with_auto_values_runs_as_written(sample_shards, tmp_path):
    """Axolotl's deepspeed_configs/zero3_bf16.json and zero2.json shapes: "auto" precision and buckets."""
    src, _ = sample_shards
    user = {"zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                                  "gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(user))
    run = tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path), deepspeed_zero_stage=3)
    for cuda in (True, False):
        config = deepspeed_config(run, world_size=2, cuda=cuda, hidden_size=64)
        assert "auto" not in json.dumps(config) and "fp16" not in config
        assert config["bf16"] == {"enabled": cuda}
        zero = config["zero_optimization"]
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    path.write_text(json.dumps({**user, "fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="remove 'fp16'"):
        tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path), deepspeed_zero_stage=3)


@pytest.mark.parametrize("content, message", [
    (None, "DeepSpeed config file not found"),
    ("{not json", "not valid JSON"),
    ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 16},
     "train_micro_batch_size_per_gpu is 16 but config.yaml gives 4; it is set from micro_batch_size"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.3}, "it is set from max_grad_norm"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage must be 1, 2 or 3, got 0"),
])
def test_a_bad_user_json_stops_config_validation_naming_it(sample_shards, tmp_path, content, message):
    src, _ = sample_shards
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as err:
        tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path))
    assert "runs.t.deepspeed_config" in str(err.value) and message in str(err.value)
    assert str(path) in str(err.value)


def test_train_batch_size_is_checked_once_ranks_are_known(sample_shards, tmp_path):
    src, _ = sample_shards
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    run = tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path))  # 8 = 4 x 1 x 2 ranks
    assert deepspeed_config(run, world_size=2, cuda=False, hidden_size=64)["train_batch_size"] == 8
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size is 8 but config.yaml gives 16"):
        deepspeed_config(run, world_size=4, cuda=False, hidden_size=64)


def test_offloading_weights_needs_stage_3(sample_shards):
    src, _ = sample_shards
    with pytest.raises(ConfigError, match="deepspeed_offload: all .* needs deepspeed_zero_stage: 3"):
        tiny_run(src, train_engine="deepspeed", deepspeed_offload="all")
