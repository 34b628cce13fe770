"""Reward modelling: TRL's loss and gradients on packed rows, pooling where transformers pools, a run
that learns, the merged sequence classifier, its vLLM folder and its evaluation."""
import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from tunedag.config import ConfigError
from tunedag.data.batches import collate
from tunedag.data.shards import ShardReader
from tunedag.evaluate.compare import evaluate_run
from tunedag.evaluate.scores import pair_rewards, reward_metrics
from tunedag.export.vllm import export_vllm
from tunedag.merge.adapter import merge_adapter
from tunedag.models.reward_head import load_reward_model, segment_rewards
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import train
from tunedag.train.reward import RewardObjective
from tests.helpers import preference_rows, tiny_run, tokenized_pairs, trl_trainer_state, write_jsonl

trl = pytest.importorskip("trl")
from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer  # noqa: E402

CPU = torch.device("cpu")
PAD = 0  # the built-in tokenizer's <pad>; its end of turn is </s>


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model_dir):
    return tokenized_pairs(tmp_path_factory.mktemp("reward"), tiny_model_dir, preference_rows(400, seed=0),
                           rl="reward", val_set_size=64, learning_rate=1e-2, lr_scheduler="constant",
                           micro_batch_size=4, save_steps=1000)


def _segments(row):
    """A packed row's samples, alone: (input ids, ...) in row order (chosen, rejected, chosen, …)."""
    cu = row["cu_seqlens"]
    return [row["input_ids"][a:b].astype(np.int64) for a, b in zip(cu[:-1], cu[1:])]


# --------------------------------------------------------------------------- loss vs TRL

@pytest.mark.parametrize("center", [0.0, 0.05])
def test_packed_loss_and_gradients_equal_trl_reward_trainer_on_unpacked_pairs(pairs, tiny_model_dir, center):
    run, packed = pairs
    run = dataclasses.replace(run, center_rewards_coefficient=center)
    model = TorchEngine(run, tiny_model_dir, CPU).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero LoRA B, so the adapters shape the rewards and get gradients of their own
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [ShardReader(packed / "train").row(i) for i in range(3)]
    batch = collate(rows, PAD)
    objective = RewardObjective(run)
    ours = objective.loss_sum(model, batch, CPU) / objective.loss_units(batch)

    segments = [s for row in rows for s in _segments(row)]
    examples = [{"chosen_ids": c.tolist(), "rejected_ids": r.tolist()} for c, r in zip(segments[::2], segments[1::2])]
    inputs = DataCollatorForPreference(pad_token_id=PAD)(examples)  # TRL's padded, unpacked batch
    state = trl_trainer_state(args=types.SimpleNamespace(center_rewards_coefficient=center or None))
    expected = RewardTrainer.compute_loss(state, model, inputs)

    assert objective.loss_units(batch) == len(examples) >= 6
    # fp32 both ways; packed and padded attention sum in another order, nothing more
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pad", ["pad", "eos"])
def test_rewards_are_read_where_transformers_reads_each_sample(pairs, tiny_model_dir, pad):
    """Each packed segment's reward is the one AutoModelForSequenceClassification gives the sample alone,
    also when the pad token is the end-of-turn token that closes every sample (then it reads the token before)."""
    _, packed = pairs
    model = load_reward_model(tiny_model_dir, torch.float32, False, seed=5).eval()
    model.config.pad_token_id = PAD if pad == "pad" else model.config.eos_token_id
    row = ShardReader(packed / "train").row(0)
    with torch.no_grad():
        rewards, labels = segment_rewards(model, collate([row], PAD), CPU)
        alone = torch.stack([model(input_ids=torch.from_numpy(s)[None]).logits[0, 0] for s in _segments(row)])
    assert len(alone) >= 4 and labels.tolist() == [1, 0] * (len(alone) // 2)
    torch.testing.assert_close(rewards, alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a run, its merge, export, evaluation

@pytest.fixture(scope="module")
def trained(pairs, tiny_model_dir, tmp_path_factory):
    run, packed = pairs
    run = dataclasses.replace(run, max_steps=20)
    out = tmp_path_factory.mktemp("reward-run")
    info = train(run, packed, tiny_model_dir, out)
    return run, packed, out, info


@pytest.fixture(scope="module")
def merged(trained, tiny_model_dir):
    run, _, out, _ = trained
    report = merge_adapter(run, tiny_model_dir, out / "adapter", out / "merged")
    return out / "merged", report


def test_reward_run_raises_held_out_pairwise_accuracy(trained, tiny_model_dir):
    run, packed, out, info = trained
    base = load_reward_model(tiny_model_dir, torch.float32, False, run.seed).eval()
    tuned = PeftModel.from_pretrained(load_reward_model(tiny_model_dir, torch.float32, False, run.seed),
                                      out / "adapter").eval()
    before = reward_metrics(pair_rewards(base, packed / "val", PAD))
    after = reward_metrics(pair_rewards(tuned, packed / "val", PAD))
    losses = [json.loads(l)["loss"] for l in (out / "train_metrics.jsonl").read_text().splitlines()]
    print(f"held-out: {before} -> {after}; loss {losses[0]:.4f} -> {np.mean(losses[-5:]):.4f}")
    assert info["steps"] == 20 and info["engine"] == "torch" and after["pairs"] >= 60
    # 64 held-out pairs: 0.85 is 5.6 standard errors above chance
    assert after["accuracy"] >= 0.85 and after["accuracy"] > before["accuracy"] + 0.2 and after["margin"] > 0
    assert np.mean(losses[-5:]) < losses[0]


def test_merged_reward_model_is_a_sequence_classifier_scoring_like_the_adapter(trained, merged, tiny_model_dir):
    run, packed, out, _ = trained
    path, report = merged
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == PAD
    assert not (path / "generation_config.json").exists()
    with safe_open(path / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert report["added_tensors"] == ["score.weight"] and report["dropped_tensors"] == ["lm_head.weight"]
    assert report["relative_logit_error"] < 1e-5  # fp32: the merge's own end-to-end check, on scores

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    tuned = PeftModel.from_pretrained(load_reward_model(tiny_model_dir, torch.float32, False, run.seed),
                                      out / "adapter").eval()
    reader = ShardReader(packed / "val")
    with torch.no_grad():  # transformers' forward of each validation sample alone, against ours on packed rows
        alone = torch.stack([model(input_ids=torch.from_numpy(s)[None]).logits[0, 0]
                             for i in range(len(reader)) for s in _segments(reader.row(i))])
    torch.testing.assert_close(alone, pair_rewards(tuned, packed / "val", PAD).reshape(-1), rtol=1e-4, atol=1e-5)


def test_vllm_export_serves_the_merged_reward_model(trained, merged, tmp_path):
    _, _, out, _ = trained
    serve = export_vllm(merged[0], out / "adapter", tmp_path / "vllm")
    assert serve["architectures"] == ["LlamaForSequenceClassification"]
    assert "--runner pooling" in serve["merged"] and serve["lora"] is None
    assert (tmp_path / "vllm/model/model.safetensors").is_file()


def test_evaluate_reports_pairwise_accuracy_of_the_untrained_and_trained_models(trained, merged, tiny_model_dir,
                                                                               tmp_path):
    run, packed, _, _ = trained
    metrics = evaluate_run(run, tiny_model_dir, merged[0], packed, tmp_path / "eval")
    base, tuned = metrics["base"], metrics["finetuned"]
    assert set(base) == {"reward", "head"} and set(tuned) == {"reward"}  # no token loss, no generations
    assert f"seed {run.seed}" in base["head"]
    assert tuned["reward"]["pairs"] == base["reward"]["pairs"] >= 60
    assert tuned["reward"]["accuracy"] >= 0.85 and metrics["improvement"]["accuracy"] > 0.2
    assert json.loads((tmp_path / "eval/metrics.json").read_text()) == metrics
    assert (tmp_path / "eval/samples.jsonl").read_text() == ""


# --------------------------------------------------------------------------- config

def test_reward_config_is_checked(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", preference_rows(4, seed=1))
    dpo = [{"path": str(src), "type": "dpo"}]
    assert tiny_run(src, datasets=dpo, rl="reward").rl == "reward"
    with pytest.raises(ConfigError, match=r"lora_modules_to_save: a reward model has no lm_head"):
        tiny_run(src, datasets=dpo, rl="reward", lora_modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match=r"center_rewards_coefficient: must be at least 0"):
        tiny_run(src, datasets=dpo, rl="reward", center_rewards_coefficient=-1.0)
    with pytest.raises(ConfigError, match=r"rl: reward trains on type: dpo data"):
        tiny_run(src, rl="reward")


# --------------------------------------------------------------------------- the DAG

@pytest.mark.e2e
def test_reward_run_goes_through_the_dag_without_gguf(tmp_path):
    from tests.test_workflow import planned_rules, snakemake

    write_jsonl(tmp_path / "data/pairs.jsonl", preference_rows(64, seed=3))
    config = {"runs": {"rm": {"base_model": "builtin:tiny-llama", "datasets": [{"path": "data/pairs.jsonl", "type": "dpo"}],
                              "rl": "reward", "sequence_len": 128, "micro_batch_size": 4, "max_steps": 2,
                              "learning_rate": 1e-2, "val_set_size": 8, "seed": 2}}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    # the default target: every stage but export_gguf
    assert planned_rules(snakemake(tmp_path, "-n")) == {
        "download", "download_model", "tokenize", "train", "merge", "evaluate", "export_vllm", "report_run",
        "report_compare", "all"}
    snakemake(tmp_path, "runs/rm/eval")
    metrics = json.loads((tmp_path / "runs/rm/eval/metrics.json").read_text())
    assert metrics["finetuned"]["reward"]["pairs"] == 8 and "seed 2" in metrics["base"]["head"]
    merged = json.loads((tmp_path / "runs/rm/merged/config.json").read_text())
    assert merged["architectures"] == ["LlamaForSequenceClassification"]
