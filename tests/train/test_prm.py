"""Process reward models (rl: prm): transformers' token-classification loss and gradients on packed rows,
a run that learns to judge steps, the merged token classifier, its evaluation, and what is not exported."""
import dataclasses
import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForTokenClassification

from tunedag.config import ConfigError, DatasetConfig
from tunedag.data.batches import collate
from tunedag.data.download import download_dataset
from tunedag.data.sample_task import ANIMALS, INSTRUCTION, OTHER_WORDS
from tunedag.data.shards import ShardReader
from tunedag.evaluate.compare import evaluate_run
from tunedag.evaluate.step_scores import step_metrics
from tunedag.export.vllm import VLLMExportError, export_vllm
from tunedag.merge.adapter import merge_adapter
from tunedag.merge.full import merge_full_model
from tunedag.models.prm_head import load_prm_model
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import train
from tunedag.train.prm import PRMObjective
from tests.helpers import tiny_run, tokenize_with_model, write_jsonl

CPU = torch.device("cpu")
PAD = 0


def step_rows(n: int, seed: int) -> list[dict]:
    """math_shepherd's shape: each step names a word of the prompt's list; right when it is the animal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(OTHER_WORDS, rng.randint(2, 4)) + [rng.choice(ANIMALS)]
        rng.shuffle(words)
        steps = rng.sample(words, rng.randint(1, 3))
        rows.append({"prompt": f"{INSTRUCTION}\n{' '.join(words)}", "completions": [f"maybe {w}" for w in steps],
                     "labels": [w in ANIMALS for w in steps]})
    return rows


def stepwise_run(root, model_dir, rows, step_separator="\n", **overrides):
    src = write_jsonl(root / "steps.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src), type="stepwise_supervised"), root / "raw")
    datasets = [{"path": str(src), "type": "stepwise_supervised", "step_separator": step_separator}]
    run = tiny_run(src, datasets=datasets, rl="prm", **overrides)
    tokenize_with_model(run, [root / "raw"], model_dir, root / "packed")
    return run, root / "packed"


@pytest.fixture(scope="module")
def steps(tmp_path_factory, tiny_model_dir):
    # no separator: a step's label sits on its word, which a tiny random model learns to judge in a few steps
    return stepwise_run(tmp_path_factory.mktemp("prm"), tiny_model_dir, step_rows(300, seed=0), step_separator="",
                        val_set_size=48, learning_rate=1e-2, lr_scheduler="constant", micro_batch_size=4,
                        save_steps=1000)


def _samples(row):
    cu = row["cu_seqlens"]
    return [(row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()) for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("adapter", ["lora", None])
def test_packed_loss_and_gradients_equal_transformers_token_classification_on_unpacked_rows(steps, tiny_model_dir,
                                                                                          adapter):
    """The loss TRL's PRMTrainer (Axolotl's) takes: the classifier's own, over a padded batch of the samples alone."""
    run, packed = steps
    run = dataclasses.replace(run, adapter=adapter)
    model = TorchEngine(run, tiny_model_dir, CPU).model.eval()  # no dropout either way
    with torch.no_grad():  # nonzero LoRA B and head bias, so every part shapes the logits
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("score.bias") or name.endswith("score.modules_to_save.default.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [ShardReader(packed / "train").row(i) for i in range(3)]
    batch = collate(rows, PAD)
    objective = PRMObjective()
    ours = objective.loss_sum(model, batch, CPU) / objective.loss_units(batch)

    samples = [s for row in rows for s in _samples(row)]
    assert len(samples) > len(rows)  # rows are packed
    width = max(len(i) for i, _ in samples)
    ids = torch.tensor([i + [PAD] * (width - len(i)) for i, _ in samples])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in samples])
    mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in samples])[:, None]).long()
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss

    assert objective.loss_units(batch) == int((labels != -100).sum()) > len(samples)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)  # fp32; only the summation order differs
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- a run, its merge, evaluation, exports

@pytest.fixture(scope="module")
def trained(steps, tiny_model_dir, tmp_path_factory):
    run, packed = steps
    run = dataclasses.replace(run, max_steps=12)
    out = tmp_path_factory.mktemp("prm-run")
    info = train(run, packed, tiny_model_dir, out)
    merge_adapter(run, tiny_model_dir, out / "adapter", out / "merged")
    return run, packed, out, info


def test_prm_run_raises_held_out_step_accuracy(trained, tiny_model_dir):
    run, packed, out, info = trained
    base = load_prm_model(tiny_model_dir, torch.float32, False, run.seed).eval()
    tuned = PeftModel.from_pretrained(load_prm_model(tiny_model_dir, torch.float32, False, run.seed),
                                      out / "adapter").eval()
    before, after = step_metrics(base, packed / "val", PAD), step_metrics(tuned, packed / "val", PAD)
    print(f"held-out steps: {before} -> {after}")
    assert info["steps"] == 12 and info["engine"] == "torch" and after["steps"] >= 60
    # each class mostly right: calling every step right (or wrong) cannot pass
    assert after["accuracy_right_steps"] >= 0.75 and after["accuracy_wrong_steps"] >= 0.75
    assert after["loss"] < before["loss"]


def test_merged_prm_is_a_token_classifier_with_the_adapters_logits(trained, tiny_model_dir):
    run, packed, out, _ = trained
    path = out / "merged"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 2
    assert not (path / "generation_config.json").exists()
    with safe_open(path / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert {"score.weight", "score.bias"} <= names and not any(n.startswith("lm_head") for n in names)
    report = json.loads((path / "tunedag_merge.json").read_text())
    assert report["relative_logit_error"] < 1e-5

    merged = AutoModelForTokenClassification.from_pretrained(path).eval()
    tuned = PeftModel.from_pretrained(load_prm_model(tiny_model_dir, torch.float32, False, run.seed),
                                      out / "adapter").eval()
    ids = torch.from_numpy(ShardReader(packed / "val").row(0)["input_ids"].astype("int64"))[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_step_accuracy_and_vllm_export_is_refused_with_the_reason(trained, tiny_model_dir, tmp_path):
    run, packed, out, _ = trained
    metrics = evaluate_run(run, tiny_model_dir, out / "merged", packed, tmp_path / "eval")
    assert set(metrics["base"]) == {"steps", "head"} and set(metrics["finetuned"]) == {"steps"}
    assert metrics["finetuned"]["steps"]["steps"] == metrics["base"]["steps"]["steps"] >= 60
    assert metrics["improvement"]["accuracy"] == pytest.approx(
        metrics["finetuned"]["steps"]["accuracy"] - metrics["base"]["steps"]["accuracy"])
    assert metrics["finetuned"]["steps"]["accuracy"] >= 0.8
    with pytest.raises(VLLMExportError, match="LlamaForTokenClassification .* not exported for vLLM"):
        export_vllm(out / "merged", out / "adapter", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_full_fine_tune_trains_and_merges_the_token_classifier(steps, tiny_model_dir, tmp_path):
    run, packed = steps
    run = dataclasses.replace(run, adapter=None, max_steps=2, learning_rate=1e-4)
    train(run, packed, tiny_model_dir, tmp_path / "run")
    report = merge_full_model(run, tiny_model_dir, tmp_path / "run/adapter", tmp_path / "merged")
    assert report["relative_logit_error"] < 1e-5
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 2


# --------------------------------------------------------------------------- config

def test_prm_config_is_checked(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", step_rows(4, seed=1))
    stepwise = [{"path": str(src), "type": "stepwise_supervised"}]
    assert tiny_run(src, datasets=stepwise, rl="prm").rl == "prm"
    with pytest.raises(ConfigError, match=r"rl: prm trains on type: stepwise_supervised data"):
        tiny_run(src, rl="prm")
    with pytest.raises(ConfigError, match=r"stepwise_supervised, which trains a process reward model: set rl: prm"):
        tiny_run(src, datasets=stepwise)
    with pytest.raises(ConfigError, match=r"lora_modules_to_save: a reward model has no lm_head"):
        tiny_run(src, datasets=stepwise, rl="prm", lora_modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match=r"max_completion_length: must be at least 1"):
        tiny_run(src, datasets=[{**stepwise[0], "max_completion_length": 0}], rl="prm")


PRM_YAML = """base_model: Qwen/Qwen2.5-3B
model_type: AutoModelForTokenClassification
num_labels: 2
process_reward_model: true
datasets:
  - path: trl-lib/math_shepherd
    type: stepwise_supervised
    step_separator: "\\n"
    max_completion_length:
    train_on_last_step_only: false
val_set_size: 0.2
sequence_len: 2048
micro_batch_size: 8
"""


def test_axolotls_prm_example_is_rl_prm_on_stepwise_rows(tmp_path, monkeypatch):
    from tunedag.config import parse_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prm.yaml").write_text(PRM_YAML)
    run = parse_config({"runs": {"r": {"axolotl": "prm.yaml"}}}, source="c.yaml").runs["r"]
    (ds,) = run.datasets
    assert run.rl == "prm" and run.adapter is None  # Axolotl's example is a full fine-tune
    assert (ds.path, ds.type, ds.step_separator, ds.max_completion_length, ds.train_on_last_step_only) == (
        "hf:trl-lib/math_shepherd", "stepwise_supervised", "\n", None, False)
    (tmp_path / "three.yaml").write_text(PRM_YAML.replace("num_labels: 2", "num_labels: 3"))
    with pytest.raises(ConfigError, match="num_labels"):
        parse_config({"runs": {"r": {"axolotl": "three.yaml"}}}, source="c.yaml")
    (tmp_path / "both.yaml").write_text(PRM_YAML + "reward_model: true\n")
    with pytest.raises(ConfigError, match="process_reward_model: .*a run trains one objective"):
        parse_config({"runs": {"r": {"axolotl": "both.yaml"}}}, source="c.yaml")


@pytest.mark.e2e
def test_a_prm_run_plans_every_stage_but_the_exports(tmp_path):
    """The DAG (a dry run): no GGUF (llama.cpp runs generators) and no vLLM folder (tunedag.export.vllm says why)."""
    from tests.test_workflow import planned_rules, snakemake

    write_jsonl(tmp_path / "data/steps.jsonl", step_rows(16, seed=3))
    config = {"runs": {"prm": {"base_model": "builtin:tiny-llama", "rl": "prm", "max_steps": 2,
                               "datasets": [{"path": "data/steps.jsonl", "type": "stepwise_supervised"}]}}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    assert planned_rules(snakemake(tmp_path, "-n")) == {
        "download", "download_model", "tokenize", "train", "merge", "evaluate", "report_run", "report_compare", "all"}


def test_a_prm_adds_no_tokens(tmp_path, tiny_model_dir):
    """Its token head is loaded over the base's embeddings as they are: a new token would have no trained row."""
    from tunedag.data.run_tokenizer import TokenizerSetupError
    from tunedag.models.loading import load_run_tokenizer

    src = write_jsonl(tmp_path / "s.jsonl", step_rows(4, seed=1))
    run = tiny_run(src, datasets=[{"path": str(src), "type": "stepwise_supervised"}], rl="prm", tokens=["<step>"])
    with pytest.raises(TokenizerSetupError, match=r"'<step>'.*rl: prm\) keeps the vocabulary it has"):
        load_run_tokenizer(tiny_model_dir, run)
