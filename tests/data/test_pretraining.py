"""Axolotl's pretraining_dataset: the streamed download of a split's first rows (max_rows, max_words), the
config's translation and its bound, and the packed rows the documents become."""
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import tokenize_with_model, write_jsonl
from tunedag.config import ConfigError, DatasetConfig, parse_config
from tunedag.data.download import download_dataset
from tunedag.data.formats import pretrain_windows
from tunedag.data.shards import ShardReader
from tunedag.data.streaming import StreamError, write_prefix
from tunedag.models.loading import load_tokenizer

WORDS = "the cat sat on a mat while dogs ran far away from home under blue skies".split()


def documents(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """``n`` rows of text of 1 to 30 words; with ``long_every``, every such row is 150 words (longer than
    the sequence_len the packing tests use)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        count = 150 if long_every and i % long_every == long_every - 1 else rng.randint(1, 30)
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(count)), "id": i})
    return rows


def hub_folder(root: Path, rows: list[dict]) -> Path:
    """A folder ``datasets.load_dataset`` reads as a dataset with a train split (no hub here)."""
    write_jsonl(root / "corpus" / "train.jsonl", rows)
    return root / "corpus"


def test_streaming_keeps_the_first_rows_that_hold_max_words(tmp_path):
    rows = documents(80)
    source = f"hf:{hub_folder(tmp_path, rows)}"
    record = download_dataset(DatasetConfig(path=source, type="completion", max_words=200), tmp_path / "raw")
    totals = np.cumsum([len(r["text"].split()) for r in rows])
    keep = int(np.argmax(totals >= 200)) + 1  # the first row at which the words reach the bound, included
    assert pq.read_table(tmp_path / "raw" / "data.parquet").to_pylist() == rows[:keep]
    assert record["rows"] == keep < len(rows) and record["words"] == totals[keep - 1] >= 200
    assert record["streamed"] and not record["exhausted"]
    assert json.loads((tmp_path / "raw" / "source.json").read_text())["max_words"] == 200


def test_max_rows_and_a_split_shorter_than_the_bound(tmp_path):
    rows = documents(30)
    source = f"hf:{hub_folder(tmp_path, rows)}"
    record = download_dataset(DatasetConfig(path=source, type="completion", max_rows=7), tmp_path / "seven")
    assert pq.read_table(tmp_path / "seven" / "data.parquet").to_pylist() == rows[:7]
    assert record["rows"] == 7 and not record["exhausted"]
    whole = download_dataset(DatasetConfig(path=source, type="completion", max_words=10**9), tmp_path / "all")
    assert whole["rows"] == 30 and whole["exhausted"]


def test_no_row_after_the_bound_is_read(tmp_path):
    rows = documents(20)

    def stream():
        for i, row in enumerate(rows):
            if i == 6:
                raise AssertionError("read a row past the bound")
            yield row

    kept = write_prefix(stream(), tmp_path / "data.parquet", "src", max_rows=6, max_words=None)
    assert kept == {"rows": 6, "exhausted": False}
    assert pq.read_table(tmp_path / "data.parquet").num_rows == 6


def test_a_row_without_the_text_field_is_named_and_nothing_is_written(tmp_path):
    rows = [{"text": "one two"}, {"body": "three"}]
    with pytest.raises(StreamError, match=r"src: row 2: field 'text' .* no such field .*set field:"):
        write_prefix(iter(rows), tmp_path / "data.parquet", "src", max_rows=None, max_words=10)
    assert not (tmp_path / "data.parquet").exists()
    kept = write_prefix(iter([{"body": "three four"}]), tmp_path / "data.parquet", "src", None, 2, text_field="body")
    assert kept == {"rows": 1, "exhausted": False, "words": 2}


def _run(tmp_path: Path, **keys) -> dict:
    return {"base_model": "builtin:tiny-llama", "max_steps": 5, "micro_batch_size": 2,
            "gradient_accumulation_steps": 3, "sequence_len": 64, **keys}


def test_pretraining_dataset_is_the_hub_split_streamed_as_far_as_max_steps_reads(tmp_path):
    entry = {"path": "allenai/c4", "name": "en", "type": "pretrain", "split": "train", "text_column": "body"}
    config = parse_config({"runs": {"r": _run(tmp_path, pretraining_dataset=[entry])}}, base_dir=tmp_path)
    (ds,) = config.runs["r"].datasets
    assert (ds.path, ds.type, ds.field, ds.max_words, ds.max_rows) == (
        "hf:allenai/c4:en@train", "pretrain", "body", 5 * 2 * 3 * 64, None)
    assert any("1,920 words" in note for note in config.notes["r"])
    own = {"path": "wikitext", "name": "wikitext-103-raw-v1", "type": "completion", "field": "text", "max_rows": 9}
    (ds,) = parse_config({"runs": {"r": _run(tmp_path, pretraining_dataset=[own])}}, base_dir=tmp_path).runs["r"].datasets
    assert (ds.path, ds.type, ds.field, ds.max_rows, ds.max_words) == (
        "hf:wikitext:wikitext-103-raw-v1", "completion", "text", 9, None)


def test_axolotls_qwen2_pretraining_example_as_written():
    """reinit_weights, pretraining_dataset, max_steps and evals_per_epoch: 0 (Axolotl's unset) as the
    qwen2 pretraining examples write them."""
    examples = Path(__file__).parents[1] / "axolotl_configs"
    config = parse_config({"runs": {"r": {"axolotl": "qwen2-pretrain.yaml"}}}, base_dir=examples)
    run = config.runs["r"]
    (ds,) = run.datasets
    assert (ds.path, ds.type, ds.max_words) == ("hf:allenai/c4:en@train", "pretrain", 305 * 4 * 2048)
    assert run.reinit_weights and run.reinit_seed == 42 and run.adapter is None and run.max_steps == 305
    assert run.evals_per_epoch is None and run.train_engine == "fsdp"


@pytest.mark.parametrize("keys, problem", [
    ({"max_steps": None}, r"r\.max_steps: required with pretraining_dataset"),
    ({"pretraining_dataset": [{"path": "a/b"}, {"path": "c/d"}]}, r"2 entries, but Axolotl streams only the first"),
    ({"datasets": [{"path": "x.jsonl"}]}, r"pretraining_dataset: set beside datasets"),
    ({"sample_packing": False}, r"r\.sample_packing: false with pretraining_dataset"),
    ({"pretraining_dataset": [{"path": "a/b", "type": "alpaca"}]}, r"pretraining_dataset\[0\]\.type: 'alpaca'"),
])
def test_pretraining_dataset_refusals(tmp_path, keys, problem):
    raw = _run(tmp_path, pretraining_dataset=[{"path": "allenai/c4", "type": "pretrain"}])
    raw.update(keys)
    with pytest.raises(ConfigError, match=problem):
        parse_config({"runs": {"r": {k: v for k, v in raw.items() if v is not None}}}, base_dir=tmp_path)


def test_max_words_is_for_streamed_hub_sources_only(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", documents(3))
    raw = {"base_model": "builtin:tiny-llama", "datasets": [{"path": str(src), "type": "completion", "max_words": 5}]}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.max_words: applies to hf: sources"):
        parse_config({"runs": {"r": raw}}, base_dir=tmp_path)


@pytest.mark.parametrize("sequence_len, words", [(16, 120), (64, 200), (64, 5), (9, 40)])
@pytest.mark.parametrize("bos", [True, False])
def test_pretrain_windows_are_the_tokenizers_overflowing_windows_as_axolotl_asks_for_them(tiny_model_dir, sequence_len,
                                                                                        words, bos):
    """Axolotl's type: pretrain tokenizes a document with truncation at sequence_len - 1, the overflowing
    windows kept with stride min(256, (sequence_len - 1) // 2), and EOS after each window."""
    tok = load_tokenizer(tiny_model_dir)
    text = " ".join(random.Random(words).choice(WORDS) for _ in range(words))
    stride = min(256, (sequence_len - 1) // 2)
    windows = tok(text, truncation=True, max_length=sequence_len - 1, add_special_tokens=bos,
                  return_overflowing_tokens=True, stride=stride)["input_ids"]
    content = tok(text, add_special_tokens=False)["input_ids"]
    samples = pretrain_windows(content, [tok.bos_token_id] if bos else [], tok.eos_token_id, sequence_len)
    assert [s.input_ids for s in samples] == [w + [tok.eos_token_id] for w in windows]
    assert all(len(s) <= sequence_len and s.labels == [-100] + s.input_ids[1:] for s in samples)
    assert (len(samples) > 1) == (len(content) + bos + 1 > sequence_len)


def test_streamed_documents_pack_whole_with_eos_and_hold_at_least_the_words_in_tokens(tmp_path, tiny_model_dir):
    rows = documents(120, seed=3, long_every=25)
    source = f"hf:{hub_folder(tmp_path, rows)}"
    config = parse_config({"runs": {"r": {
        "base_model": "builtin:tiny-llama", "pretraining_dataset": source.removeprefix("hf:"), "max_steps": 2,
        "micro_batch_size": 4, "sequence_len": 64, "val_set_size": 2}}}, base_dir=Path("/"))
    run = config.runs["r"]
    (ds,) = run.datasets
    record = download_dataset(ds, tmp_path / "raw")
    assert record["words"] >= ds.max_words == 2 * 4 * 64
    tokenize_with_model(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    tok = load_tokenizer(tiny_model_dir)
    kept = [r["text"] for r in rows[:record["rows"]]]
    encoded = [[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
               for text in kept]
    assert sum(len(ids) for ids in encoded) >= record["words"]  # a word is at least one token
    pieces = []
    for split in ("train", "val"):
        reader = ShardReader(tmp_path / "packed" / split)
        for i in range(reader.num_rows):
            row = reader.row(i)
            assert len(row["input_ids"]) <= 64
            for a, b in zip(row["cu_seqlens"][:-1], row["cu_seqlens"][1:]):
                ids, labels = row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()
                assert row["position_ids"][a:b].tolist() == list(range(b - a))  # attention kept within each
                assert labels == [-100] + ids[1:]  # every token trained but the first, which nothing predicts
                pieces.append(ids)
    # each document is BOS + its tokens + EOS, whole, or (longer than sequence_len) in overlapping windows
    expected = [w.input_ids for ids in encoded for w in pretrain_windows(ids[1:-1], ids[:1], ids[-1], 64)]
    assert any(len(ids) > 64 for ids in encoded) and len(expected) > len(encoded)
    assert sorted(pieces) == sorted(expected)
