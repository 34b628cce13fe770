"""DeepSpeed ZeRO stage 1 (optimizer state sharded): Axolotl's deepspeed_configs/zero1.json as written, on
2 CPU ranks, training a reward model in full against one process (Axolotl's qwen3/reward-model.yaml)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tunedag.config import ConfigError, load_run
from tunedag.train.loop import train
from tests.helpers import preference_rows, tiny_run, tokenized_pairs
from tests.train.ranks import metrics, torchrun_train, write_runs

pytest.importorskip("deepspeed")
from tunedag.train.deepspeed_engine import deepspeed_config  # noqa: E402  (needs deepspeed's extra)

# Axolotl's deepspeed_configs/zero1.json
ZERO1 = {"zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": "auto"},
         "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
         "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}


def test_stage_1_is_generated_and_read(sample_shards, tmp_path):
    src, _ = sample_shards
    generated = deepspeed_config(tiny_run(src, train_engine="deepspeed", deepspeed_zero_stage=1), 2, cuda=True,
                                 hidden_size=64)
    assert generated["zero_optimization"] == {"stage": 1}
    path = tmp_path / "zero1.json"
    path.write_text(json.dumps(ZERO1))
    user = deepspeed_config(tiny_run(src, train_engine="deepspeed", deepspeed_config=str(path)), 2, cuda=True,
                            hidden_size=64)
    # DeepSpeed overlaps stage 1's reduction only when it ends the optimizer steps itself, not under tunedag's loop
    assert user["zero_optimization"] == {"stage": 1, "overlap_comm": False} and user["bf16"] == {"enabled": True}
    with pytest.raises(ConfigError, match="deepspeed_offload: all .* needs deepspeed_zero_stage: 3"):
        tiny_run(src, train_engine="deepspeed", deepspeed_zero_stage=1, deepspeed_offload="all")


def test_rl_on_a_stage_3_json_is_refused_naming_it(sample_shards, tmp_path):
    src, _ = sample_shards
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({**ZERO1, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=f"deepspeed_config: {path} runs ZeRO stage 3, on which rl: dpo"):
        tiny_run(src, datasets=[{"path": str(src), "type": "dpo"}], rl="dpo", adapter=None,
                 train_engine="deepspeed", deepspeed_config=str(path))


def test_zero1_full_reward_model_on_two_ranks_matches_one_process(tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 2 = 1 process x micro-batch 4: the same pairs per step, the same pair mean."""
    run, shards = tokenized_pairs(tmp_path / "data", tiny_model_dir, preference_rows(64, seed=4), rl="reward")
    (tmp_path / "zero1.json").write_text(json.dumps(ZERO1))
    reward = {"datasets": [{"path": run.datasets[0].path, "type": "dpo"}], "rl": "reward", "adapter": None,
              "lora_modules_to_save": [], "max_steps": 3, "learning_rate": 1e-3, "max_grad_norm": 0.5,
              "center_rewards_coefficient": 0.01}
    config = write_runs(tmp_path / "config.yaml", tmp_path / "unused", {
        "ds": {**reward, "train_engine": "deepspeed", "deepspeed_config": str(tmp_path / "zero1.json"),
               "micro_batch_size": 2},
        "single": {**reward, "micro_batch_size": 4}})
    torchrun_train(config, "ds", shards, tiny_model_dir, tmp_path / "ds")
    train(load_run(config, "single")[1], shards, tiny_model_dir, tmp_path / "single")
    info = json.loads((tmp_path / "ds/train_info.json").read_text())
    assert info["zero_stage"] == 1 and info["world_size"] == 2 and info["steps"] == 3
    ranks, single = metrics(tmp_path / "ds"), metrics(tmp_path / "single")
    # fp32 sums in another order (two ranks, then a reduction)
    assert [m["loss"] for m in ranks] == pytest.approx([m["loss"] for m in single], rel=1e-5)
    assert [m["grad_norm"] for m in ranks] == pytest.approx([m["grad_norm"] for m in single], rel=1e-4)
    a, b = (load_file(tmp_path / d / "adapter/model.safetensors") for d in ("ds", "single"))
    assert a.keys() == b.keys() and "score.weight" in a
    for name in a:  # as tests/train/ranks.py argues: Adam turns rounding of tiny gradients into up to one lr step
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-3)
        assert float((a[name] - b[name]).norm()) <= 1e-3 * float(b[name].norm()), name
