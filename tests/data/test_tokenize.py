"""The tokenize stage: formats, packing invariants, shards, manifest, and bad input."""
import json
import shutil
from collections import Counter

import pytest

from tunedag.config import DatasetConfig
from tunedag.data.download import download_dataset
from tunedag.data.formats import IGNORE_INDEX, RowFormatError, Sample, tokenize_alpaca
from tunedag.data.packing import pack_best_fit, packing_efficiency
from tunedag.data.shards import ShardReader
from tunedag.data.tokenize import TokenizeError, tokenize_run
from tunedag.models.loading import load_tokenizer
from tests.helpers import sample_rows, tiny_run, write_jsonl


def test_alpaca_masks_the_prompt_and_trains_the_answer_and_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    row = {"instruction": "Which word in the list is an animal?", "input": "red owl plum", "output": "owl"}
    sample = tokenize_alpaca(row, tok, train_on_inputs=False)
    prompt = "### Instruction:\nWhich word in the list is an animal?\n\n### Input:\nred owl plum\n\n### Response:\n"
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok("owl", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sample.input_ids == prompt_ids + answer_ids
    assert sample.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert tok.decode(sample.input_ids, skip_special_tokens=False) == "<s>" + prompt + "owl</s>"


def test_train_on_inputs_trains_the_prompt_except_the_first_token(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    sample = tokenize_alpaca({"instruction": "a", "output": "b"}, tok, train_on_inputs=True)
    assert sample.labels[0] == IGNORE_INDEX and sample.labels[1:] == sample.input_ids[1:]


@pytest.mark.parametrize("row, message", [
    ({"output": "b"}, "missing field 'instruction'"),
    ({"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
])
def test_malformed_alpaca_rows(tiny_model_dir, row, message):
    with pytest.raises(RowFormatError, match=message):
        tokenize_alpaca(row, load_tokenizer(tiny_model_dir), False)


def test_packing_keeps_every_token_once_and_restarts_positions():
    samples = [Sample(list(range(100 * i, 100 * i + n)), [7] * n) for i, n in enumerate([5, 17, 3, 31, 9, 12, 30, 1, 8])]
    rows = pack_best_fit(samples, sequence_len=32, seed=3)
    packed = Counter(tuple(r.input_ids[a:b]) for r in rows for a, b in zip(r.cu_seqlens, r.cu_seqlens[1:]))
    assert packed == Counter(tuple(s.input_ids) for s in samples)
    for r in rows:
        assert len(r.input_ids) <= 32 and r.cu_seqlens[-1] == len(r.input_ids) == len(r.labels)
        for a, b in zip(r.cu_seqlens, r.cu_seqlens[1:]):
            assert r.position_ids[a:b] == list(range(b - a))
    assert len(rows) == 4  # 116 tokens need at least 4 rows of 32
    assert packing_efficiency(rows, 32) == pytest.approx(116 / 128)
    assert [r.input_ids for r in pack_best_fit(samples, 32, seed=3)] == [r.input_ids for r in rows]


def _prepare(tmp_path, tiny_model_dir, n_rows=200, **overrides):
    src = write_jsonl(tmp_path / "src.jsonl", sample_rows(n_rows))
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    return tiny_run(src, **overrides)


def test_tokenize_writes_shards_and_manifest(tmp_path, tiny_model_dir):
    run = _prepare(tmp_path, tiny_model_dir, val_set_size=0.1)
    manifest = tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    on_disk = json.loads((tmp_path / "packed/manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["splits"]["train"]["samples"] == 180 and manifest["splits"]["val"]["samples"] == 20
    assert manifest["config_hash"] == run.stage_hash("tokenize")
    assert len(manifest["code_hash"]) == len(manifest["tokenizer_hash"]) == 64
    assert manifest["splits"]["train"]["packing_efficiency"] > 0.8  # ~33-token samples in 128-token rows
    reader = ShardReader(tmp_path / "packed/train")
    assert len(reader) == manifest["splits"]["train"]["rows"]
    assert sum(len(reader.row(i)["input_ids"]) for i in range(len(reader))) == manifest["splits"]["train"]["tokens"]
    prompts = (tmp_path / "packed/val_prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 20 and json.loads(prompts[0])["prompt"].endswith("### Response:\n")


def test_same_config_gives_byte_identical_shards(tmp_path, tiny_model_dir):
    run = _prepare(tmp_path, tiny_model_dir)
    tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "a")
    tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "b")
    for name in ("train/shard-00000.arrow", "val/shard-00000.arrow", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_reader_orders_are_seeded_per_epoch_and_split_by_rank(tmp_path, tiny_model_dir):
    run = _prepare(tmp_path, tiny_model_dir, n_rows=400)
    tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    reader = ShardReader(tmp_path / "packed/train")
    assert reader.epoch_order(0, 1) == reader.epoch_order(0, 1) != reader.epoch_order(1, 1)
    ranks = [ShardReader(tmp_path / "packed/train", rank=r, world_size=2).epoch_order(0, 1) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1])
    rows = list(reader.iter_rows(0, 1, start=2))
    assert [list(r["input_ids"]) for r in rows] == [list(reader.row(i)["input_ids"]) for i in reader.epoch_order(0, 1)[2:]]


def test_val_set_larger_than_data_is_an_error(tmp_path, tiny_model_dir):
    run = _prepare(tmp_path, tiny_model_dir, n_rows=10, val_set_size=10)
    with pytest.raises(TokenizeError, match="val_set_size 10.0 leaves no training rows .*10 rows"):
        tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_malformed_row_names_file_and_row_and_leaves_no_output(tmp_path, tiny_model_dir):
    rows = sample_rows(20)
    del rows[7]["output"]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    with pytest.raises(RowFormatError, match=r"raw/data\.parquet \(source .*src\.jsonl\): row 7: missing field 'output'"):
        tokenize_run(tiny_run(src), [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_unpacked_rows_hold_one_sample_each(tmp_path, tiny_model_dir):
    run = _prepare(tmp_path, tiny_model_dir, sample_packing=False)
    manifest = tokenize_run(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    assert manifest["padded"] is True
    assert manifest["splits"]["train"]["rows"] == manifest["splits"]["train"]["samples"]
