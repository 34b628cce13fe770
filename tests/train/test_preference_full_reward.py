"""A reward model as a full fine-tune (``adapter: null``): the decoder and the score head train, the merge
stage writes the whole sequence classifier, and vLLM's folder and the evaluate stage take it."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tunedag.evaluate.compare import evaluate_run
from tunedag.export.vllm import export_vllm
from tunedag.merge.full import merge_full_model
from tunedag.merge.weights import MergeError
from tunedag.models.reward_head import load_reward_model
from tunedag.train.loop import train
from tests.helpers import preference_rows, tokenized_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reward-full")
    run, packed = tokenized_pairs(root, tiny_model_dir, preference_rows(48, seed=0), rl="reward", adapter=None,
                                  val_set_size=8, learning_rate=1e-3, micro_batch_size=4, max_steps=3,
                                  center_rewards_coefficient=0.01)
    info = train(run, packed, tiny_model_dir, root / "run")
    return run, packed, root, info


def test_every_weight_and_the_score_head_train(trained, tiny_model_dir):
    run, _, root, info = trained
    assert info["steps"] == 3 and info["engine"] == "torch"
    weights = load_file(root / "run/adapter/model.safetensors")
    start = load_reward_model(tiny_model_dir, torch.float32, False, run.seed).state_dict()
    assert weights.keys() == start.keys() and "score.weight" in weights and "lm_head.weight" not in weights
    assert [n for n in start if torch.equal(weights[n], start[n])] == []
    config = json.loads((root / "run/adapter/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]


def test_merge_writes_the_sequence_classifier_that_serves_and_evaluates(trained, tiny_model_dir):
    run, packed, root, _ = trained
    report = merge_full_model(run, tiny_model_dir, root / "run/adapter", root / "merged")
    assert report["written_tensors"] == len(load_file(root / "run/adapter/model.safetensors"))
    assert report["relative_logit_error"] < 1e-4  # the merged folder's scores against the trained model's
    config = json.loads((root / "merged/config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert len(config["id2label"]) == 1 and not (root / "merged/generation_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(root / "merged")
    assert model.score.weight.shape == (1, model.config.hidden_size)
    export_vllm(root / "merged", root / "run/adapter", root / "vllm")
    assert (root / "vllm/model/config.json").is_file() and not (root / "vllm/adapter").exists()
    metrics = evaluate_run(run, tiny_model_dir, root / "merged", packed, root / "eval")
    assert metrics["finetuned"]["reward"]["pairs"] >= 4


def test_merge_refuses_a_causal_lm_folder_for_a_reward_run(trained, tiny_model_dir, tmp_path):
    """A reward run's trained folder without its score head (here: the base causal LM) is no reward model."""
    run, _, _, _ = trained
    with pytest.raises(MergeError, match=r"lm_head.weight .* has no counterpart .* as a reward model"):
        merge_full_model(run, tiny_model_dir, tiny_model_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
