"""special_tokens and tokens (Axolotl's keys): the run's tokenizer from tokenize to the merged folder."""
import json
import re
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedag.config import ConfigError, DatasetConfig, parse_config
from tunedag.data.download import download_dataset
from tunedag.data.run_tokenizer import TokenizerSetupError
from tunedag.data.shards import ShardReader
from tunedag.evaluate.compare import evaluate_run
from tunedag.export.gguf import write_gguf
from tunedag.export.vllm import export_vllm
from tunedag.merge.adapter import merge_adapter
from tunedag.merge.full import merge_full_model
from tunedag.models.loading import load_causal_lm, load_run_tokenizer, load_tokenizer
from tunedag.train.loop import train
from tests.helpers import sample_rows, tiny_run, tokenize_with_model, write_jsonl

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _rows(n: int) -> list[dict]:
    """The built-in task with the new token inside each answer, so it must be read as one id."""
    return [{**r, "output": f"{IM_START}{r['output']}"} for r in sample_rows(n)]


def _tokenized(tmp_path, model_dir, rows, **overrides):
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    run = tiny_run(src, **overrides)
    manifest = tokenize_with_model(run, [tmp_path / "raw"], model_dir, tmp_path / "packed")
    return run, manifest, ShardReader(tmp_path / "packed" / "train")


def _all(reader: ShardReader, key: str) -> np.ndarray:
    return np.concatenate([reader.row(i)[key] for i in range(len(reader))])


def test_axolotl_special_tokens_and_tokens_become_run_keys():
    raw = {"runs": {"r": {"base_model": "builtin:tiny-llama", "datasets": [{"path": "hf:a/b"}], "adapter": None,
                          "special_tokens": {"eos_token": IM_END}, "tokens": [IM_START], "model_type": "x"}}}
    run = parse_config(raw).runs["r"]
    assert run.special_tokens.eos_token == IM_END and run.tokens == [IM_START]
    assert "special_tokens" in run.stage_slice("tokenize") and "tokens" in run.stage_slice("merge")


def test_an_existing_token_as_eos_adds_no_id_and_ends_every_sample(tmp_path, tiny_model_dir):
    base = load_tokenizer(tiny_model_dir)
    word = base.convert_ids_to_tokens(300)  # an ordinary token of the vocabulary
    run, manifest, reader = _tokenized(tmp_path, tiny_model_dir, sample_rows(40),
                                       special_tokens={"eos_token": word}, val_set_size=2)
    assert len(load_run_tokenizer(tiny_model_dir, run)) == len(base) == manifest["vocab_size"]
    assert manifest["eos_token_id"] == 300
    labels, samples = _all(reader, "labels"), manifest["splits"]["train"]["samples"]
    # alpaca trains output + EOS: every sample's trained EOS is the run's, the base's </s> is gone
    assert (labels == base.eos_token_id).sum() == 0
    assert (labels == 300).sum() >= samples


def test_new_tokens_are_one_id_each_in_the_packed_rows(tmp_path, tiny_model_dir):
    n = len(load_tokenizer(tiny_model_dir))
    run, manifest, reader = _tokenized(tmp_path, tiny_model_dir, _rows(40), adapter=None, val_set_size=2,
                                       special_tokens={"eos_token": IM_END}, tokens=[IM_START])
    tok = load_run_tokenizer(tiny_model_dir, run)
    assert (tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(IM_START)) == (n, n + 1)
    assert manifest["vocab_size"] == n + 2 and manifest["eos_token_id"] == n
    ids, labels = _all(reader, "input_ids"), _all(reader, "labels")
    samples = manifest["splits"]["train"]["samples"]
    assert (ids == n + 1).sum() == samples and (labels == n).sum() == samples  # one <|im_start|>, one EOS each
    row = reader.row(0)
    text = tok.decode(row["input_ids"][: row["cu_seqlens"][1]])
    assert text.count(IM_START) == 1 and text.endswith(IM_END)


@pytest.mark.parametrize("keys, refused", [
    ({"tokens": [IM_START]}, True),
    ({"special_tokens": {"eos_token": IM_END}}, True),
    ({"special_tokens": {"pad_token": "<newpad>"}}, False),  # padding is never trained
    ({"tokens": [IM_START], "lora_modules_to_save": ["embed_tokens", "lm_head"]}, False),
])
def test_lora_with_new_tokens_needs_the_embedding_rows_trained(tiny_model_dir, keys, refused):
    run = tiny_run(tiny_model_dir / "config.json", adapter="lora", **keys)
    if refused:
        with pytest.raises(TokenizerSetupError, match=r"lora_modules_to_save: \[embed_tokens, lm_head\]"):
            load_run_tokenizer(tiny_model_dir, run)
    else:
        load_run_tokenizer(tiny_model_dir, run)


def test_embeddings_grow_with_mean_rows_and_leave_the_rng_alone(tiny_model_dir):
    base = load_causal_lm(tiny_model_dir)
    n = base.config.vocab_size
    torch.manual_seed(5)
    grown = load_causal_lm(tiny_model_dir, vocab_size=n + 3)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))  # the new rows drew nothing from the global RNG
    assert grown.config.vocab_size == n + 3
    for old, new in ((base.get_input_embeddings(), grown.get_input_embeddings()),
                     (base.get_output_embeddings(), grown.get_output_embeddings())):
        assert new.weight.shape == (n + 3, old.weight.shape[1])
        torch.testing.assert_close(new.weight[:n], old.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.weight[n:], old.weight.mean(0).expand(3, -1), rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[1, 5, n, n + 2]])
    assert grown(input_ids=ids).logits.shape == (1, 4, n + 3)


def _train_and_merge(tmp_path, model_dir, **overrides):
    run, manifest, _ = _tokenized(tmp_path, model_dir, _rows(24), tokens=[IM_START], val_set_size=2,
                                  special_tokens={"eos_token": IM_END}, max_steps=2, learning_rate=1e-2,
                                  merge_dtype="float32", train_engine="torch", eval_max_new_tokens=8,
                                  **overrides)
    train(run, tmp_path / "packed", model_dir, tmp_path / "run")
    merge = merge_adapter if run.adapter else merge_full_model
    report = merge(run, model_dir, tmp_path / "run" / "adapter", tmp_path / "merged")
    return run, manifest, report


@pytest.mark.parametrize("overrides", [{"adapter": "lora", "lora_modules_to_save": ["embed_tokens", "lm_head"]},
                                       {"adapter": None}])
def test_merged_folder_holds_the_grown_embeddings_and_the_runs_tokenizer(tmp_path, tiny_model_dir, overrides):
    run, manifest, report = _train_and_merge(tmp_path, tiny_model_dir, **overrides)
    n = len(load_tokenizer(tiny_model_dir))
    merged = tmp_path / "merged"
    assert report["relative_logit_error"] < 1e-4  # merge's own end-to-end check ran on the grown model
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.config.vocab_size == len(tok) == n + 2 == manifest["vocab_size"]
    assert (tok.eos_token, tok.convert_tokens_to_ids(IM_START)) == (IM_END, n + 1)
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == n
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"][0] == n
    weights = load_file(merged / "model.safetensors")
    trained = weights["model.embed_tokens.weight"][n:]
    mean = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"].mean(0)
    assert (trained - mean).abs().max() > 1e-4  # the new rows trained away from their mean start
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, n + 1, 7, n]])).logits.shape[-1] == n + 2
    if run.adapter:
        check_downstream(run, tmp_path, tiny_model_dir, merged, n)


def check_downstream(run, tmp_path, base, merged, n):
    """Evaluate compares the grown base with the merged model on shards holding the new ids; the GGUF holds
    the new tokens at their ids with the run's EOS; vLLM serves the merged model only."""
    metrics = evaluate_run(run, base, merged, tmp_path / "packed", tmp_path / "eval")
    assert math.isfinite(metrics["base"]["val_loss"]) and math.isfinite(metrics["finetuned"]["val_loss"])
    write_gguf(merged, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == n + 2 and tokens[n:] == [IM_END, IM_START]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == n
    assert n + 2 in tuple(next(t for t in reader.tensors if t.name == "token_embd.weight").shape)
    serve = export_vllm(merged, tmp_path / "run" / "adapter", tmp_path / "vllm")
    assert serve["lora"] is None and "added tokens" in serve["lora_note"]  # the base lacks their rows
    assert AutoTokenizer.from_pretrained(tmp_path / "vllm" / "model").convert_tokens_to_ids(IM_START) == n + 1


def test_fsdp_shards_start_from_the_same_grown_rows(tiny_model_dir):
    from tunedag.train.fsdp_engine import load_shards_, meta_model

    run = tiny_run(tiny_model_dir / "config.json", adapter=None, tokens=[IM_START, IM_END])
    n = len(load_tokenizer(tiny_model_dir))
    model = meta_model(run, tiny_model_dir)
    model.to_empty(device="cpu")
    load_shards_(model, tiny_model_dir)
    reference = dict(load_causal_lm(tiny_model_dir, vocab_size=n + 2).named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=0)
    assert model.get_input_embeddings().weight.shape[0] == n + 2


@pytest.mark.parametrize("keys, where", [({"tokens": ["<a>", " "]}, "tokens[1]"),
                                         ({"special_tokens": {"eos_token": ""}}, "special_tokens.eos_token")])
def test_an_empty_token_is_refused_by_the_config_check(tiny_model_dir, keys, where):
    with pytest.raises(ConfigError, match=rf"runs\.t\.{re.escape(where)}: an empty token"):
        tiny_run(tiny_model_dir / "config.json", **keys)
