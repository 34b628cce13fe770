"""Merge, evaluate and export_vllm on the built-in tiny model with a random (non-zero) adapter."""
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunedag.config import DatasetConfig
from tunedag.data.download import download_dataset
from tunedag.data.shards import ShardReader
from tunedag.evaluate.compare import evaluate_run, teacher_forced_metrics
from tunedag.export.vllm import VLLMExportError, export_vllm
from tunedag.merge import weights as merge_weights
from tunedag.merge.adapter import MergeError, merge_adapter
from tunedag.merge.weights import parse_size
from tunedag.models.loading import load_causal_lm
from tests.helpers import sample_rows, tiny_run, tokenize_with_model, write_jsonl


def make_adapter(model_dir, dest, r=8):
    torch.manual_seed(0)
    base = load_causal_lm(model_dir)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter really changes the model
    get_peft_model(base, config).save_pretrained(dest)
    return dest


def _run(tmp_path, **overrides):
    src = write_jsonl(tmp_path / "src.jsonl", sample_rows(60))
    return tiny_run(src, **overrides), src


def test_merged_model_reproduces_base_plus_adapter(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    run, _ = _run(tmp_path, merge_dtype="float32")
    report = merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    assert report["relative_logit_error"] < 1e-5 and report["merged_tensors"] == 12
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), adapter)
    base = load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, merged.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref, plain = merged(ids).logits, adapted(ids).logits, base(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-2  # the adapter is not a no-op
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "merged" / name).is_file()


def test_merge_casts_to_the_requested_dtype(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    run, _ = _run(tmp_path, merge_dtype="bfloat16", max_shard_size="1MB")
    merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    assert (tmp_path / "merged/model.safetensors.index.json").is_file()  # sharded at 1MB
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_a_merge_that_does_not_reproduce_the_adapter_fails_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    run, _ = _run(tmp_path)
    real = merge_weights.merge_tensor
    monkeypatch.setattr(merge_weights, "merge_tensor", lambda w, lora, scale: real(w, lora, scale / 2))
    with pytest.raises(MergeError, match=r"merged model\.layers\.0\..*differs from base \+ adapter"):
        merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # with the per-tensor check out of the way, the end-to-end logit check still catches it
    monkeypatch.setattr(merge_weights, "check_tensor", lambda *args: 0.0)
    with pytest.raises(MergeError, match="merged model's logits differ from base \\+ adapter"):
        merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}])
def test_rslora_dora_and_saved_modules_merge_like_peft(tmp_path, tiny_model_dir, variant):
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False, **variant)
    model = get_peft_model(load_causal_lm(tiny_model_dir), config)
    if "modules_to_save" in variant:
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(tmp_path / "adapter")
    run, _ = _run(tmp_path, merge_dtype="float32")
    report = merge_adapter(run, tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert report["relative_logit_error"] < 1e-5 and report["max_relative_tensor_error"] < 1e-5


def test_qlora_merge_uses_the_nf4_rounded_base(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    run, _ = _run(tmp_path, adapter="qlora", merge_dtype="float32")
    report = merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    assert report["relative_logit_error"] < 1e-5  # against PEFT on the NF4-rounded base
    merged = load_file(tmp_path / "merged/model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    untouched = "model.layers.0.self_attn.k_proj.weight"  # no adapter here, but NF4-rounded in training
    assert not torch.equal(merged[untouched], base[untouched])
    torch.testing.assert_close(merged[untouched], base[untouched], rtol=0, atol=0.2 * base[untouched].abs().max())
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_shard_sizes_parse():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("500MiB") == 500 * 2**20
    with pytest.raises(MergeError, match="max_shard_size 'big'"):
        parse_size("big")


def test_missing_adapter_is_named(tmp_path, tiny_model_dir):
    run, _ = _run(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope: no adapter_config.json"):
        merge_adapter(run, tiny_model_dir, tmp_path / "nope", tmp_path / "merged")


def test_perplexity_is_exp_of_the_mean_token_loss(tmp_path, tiny_model_dir):
    run, src = _run(tmp_path, sample_packing=False, val_set_size=6)
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    tokenize_with_model(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    model = load_causal_lm(tiny_model_dir).eval()
    metrics = teacher_forced_metrics(model, tmp_path / "packed/val", pad_id=0)
    # independent: HF's own loss per unpadded sample, weighted by its trained tokens
    reader, total, tokens = ShardReader(tmp_path / "packed/val"), 0.0, 0
    with torch.no_grad():
        for i in range(len(reader)):
            row = reader.row(i)
            ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
            labels = torch.tensor(row["labels"], dtype=torch.long)[None]
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    assert metrics["val_tokens"] == tokens
    assert metrics["val_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_evaluate_writes_base_and_finetuned_side_by_side(tmp_path, tiny_model_dir):
    run, src = _run(tmp_path, val_set_size=5, eval_max_new_tokens=3)
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    tokenize_with_model(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    metrics = evaluate_run(run, tiny_model_dir, tmp_path / "merged", tmp_path / "packed", tmp_path / "eval")
    assert json.loads((tmp_path / "eval/metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["prompts"] == 5
    assert metrics["base"]["val_loss"] != metrics["finetuned"]["val_loss"]
    samples = [json.loads(l) for l in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5
    assert {"prompt", "reference", "base", "finetuned", "base_sampled", "finetuned_sampled"} <= samples[0].keys()
    for label in ("base", "finetuned"):
        assert {"exact_match", "token_f1", "rouge_l"} <= metrics[label].keys() <= metrics[label].keys()
        assert {"exact_match", "token_f1", "rouge_l"} == metrics[label]["sampled"].keys()


def test_vllm_export_loads_with_transformers_and_peft(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=8)
    run, _ = _run(tmp_path)
    merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    serve = export_vllm(tmp_path / "merged", adapter, tmp_path / "vllm")
    assert serve["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "vllm/model")
    lora = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), tmp_path / "vllm/adapter")
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lora(ids).logits, rtol=1e-4, atol=1e-5)


def test_vllm_export_of_expert_lora_serves_the_merged_model_only(tmp_path, tiny_model_dir):
    """An adapter with LoRA on a mixture of experts' expert weights (peft target_parameters): the merged
    folder is served, and serve.json says why the adapter is not."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=8)
    run, _ = _run(tmp_path)
    merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    serve = export_vllm(tmp_path / "merged", adapter, tmp_path / "vllm")
    assert serve["lora"] is None and "mlp.experts.gate_up_proj" in serve["lora_note"]
    assert serve["merged"].startswith("vllm serve model")
    assert json.loads((tmp_path / "vllm/serve.json").read_text()) == serve


def test_vllm_export_refuses_a_rank_vllm_cannot_serve(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=12)
    run, _ = _run(tmp_path)
    merge_adapter(run, tiny_model_dir, adapter, tmp_path / "merged")
    with pytest.raises(VLLMExportError, match="LoRA rank 12 is not one vLLM serves"):
        export_vllm(tmp_path / "merged", adapter, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_lm_eval_tasks_say_why_they_did_not_run(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    from tunedag.evaluate.compare import lm_eval_tasks
    assert lm_eval_tasks(tmp_path, ["hellaswag"], torch.device("cpu")) == {
        "skipped": "lm-evaluation-harness is not installed (pip install lm-eval)"}
