"""The tokenize stage: shards and manifest, determinism, mixing, lengths, cache keys, bad input."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tunedag.config import DatasetConfig
from tunedag.data import chat, tokenize
from tunedag.data.download import download_dataset
from tunedag.data.formats import IGNORE_INDEX, RowFormatError
from tunedag.data.shards import ShardReader
from tunedag.data.tokenize import TokenizeError, code_hash
from tests.data.wordtok import save_word_tokenizer
from tests.helpers import sample_rows, tiny_run, tokenize_with_model, write_jsonl


def _prepare(tmp_path, rows, name="src", **overrides):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw" / name)
    return src


def _run(tmp_path, model, rows=None, out="packed", processes=1, ds=None, **overrides):
    src = _prepare(tmp_path, rows if rows is not None else sample_rows(200))
    run = tiny_run(src, datasets=[{"path": str(src), **(ds or {"type": "alpaca"})}], **overrides)
    return run, tokenize_with_model(run, [tmp_path / "raw/src"], model, tmp_path / out, processes=processes)


def chats(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "cat dog fox owl red sun moon star rain".split()
    return [{"conversations": [{"from": "human", "value": " ".join(rng.choice(words, rng.integers(2, 9)))},
                               {"from": "gpt", "value": " ".join(rng.choice(words, rng.integers(1, 12)))}]}
            for _ in range(n)]


def test_tokenize_writes_shards_and_manifest(tmp_path, tiny_model_dir):
    run, manifest = _run(tmp_path, tiny_model_dir, val_set_size=0.1)
    on_disk = json.loads((tmp_path / "packed/manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["splits"]["train"]["samples"] == 180 and manifest["splits"]["val"]["samples"] == 20
    assert manifest["config_hash"] == run.stage_hash("tokenize") and manifest["objective"] == "sft"
    assert len(manifest["code_hash"]) == len(manifest["tokenizer_hash"]) == 64
    assert manifest["splits"]["train"]["packing_efficiency"] > 0.8  # ~35-token samples in 128-token rows
    reader = ShardReader(tmp_path / "packed/train")
    assert len(reader) == manifest["splits"]["train"]["rows"]
    assert sum(len(reader.row(i)["input_ids"]) for i in range(len(reader))) == manifest["splits"]["train"]["tokens"]
    prompts = (tmp_path / "packed/val_prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 20 and json.loads(prompts[0])["prompt"].endswith("### Response:\n")
    assert not list(tmp_path.glob(".packed*"))  # no temporary folder left


def test_same_config_gives_byte_identical_shards_for_any_process_count(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tokenize, "UNIT_ROWS", 64)  # 4 units of work from 200 rows
    _run(tmp_path, tiny_model_dir, out="a")
    _run(tmp_path, tiny_model_dir, out="b")
    _run(tmp_path, tiny_model_dir, out="c", processes=2)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([n for n in names if n.parts[0] == "train"]) == 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() == \
            (tmp_path / "c" / name).read_bytes(), name


def test_reader_orders_are_seeded_split_by_rank_and_resume_exactly(tmp_path, tiny_model_dir):
    _run(tmp_path, tiny_model_dir, rows=sample_rows(400))
    reader = ShardReader(tmp_path / "packed/train")
    assert reader.epoch_order(0, 1) == reader.epoch_order(0, 1) != reader.epoch_order(1, 1)
    ranks = [ShardReader(tmp_path / "packed/train", rank=r, world_size=2) for r in range(2)]
    orders = [r.epoch_order(0, 1) for r in ranks]
    assert not set(orders[0]) & set(orders[1]) and len(orders[0]) == len(orders[1])
    for rank in ranks:
        full = [(e, o, row["input_ids"].tolist()) for e, o, row in rank.stream(seed=1, num_epochs=2)]
        for k in (0, 1, len(rank) - 1, len(rank), len(rank) + 3):
            epoch, offset = (0, 0) if k == 0 else full[k - 1][:2]
            resumed = [(e, o, row["input_ids"].tolist()) for e, o, row in
                       rank.stream(seed=1, epoch=epoch, offset=offset, num_epochs=2)]
            assert resumed == full[k:]


def test_datasets_mix_with_weights(tmp_path, tiny_model_dir):
    a = _prepare(tmp_path, sample_rows(100, seed=1), "a")
    b = _prepare(tmp_path, chats(60), "b")
    run = tiny_run(a, val_set_size=10, datasets=[{"path": str(a), "weight": 2.0},
                                                 {"path": str(b), "type": "sharegpt", "weight": 0.5}])
    manifest = tokenize_with_model(run, [tmp_path / "raw/a", tmp_path / "raw/b"], tiny_model_dir, tmp_path / "packed")
    a_rec, b_rec = manifest["datasets"]
    assert (a_rec["train_rows"], a_rec["train_samples"]) == (90, 180)
    assert (b_rec["train_rows"], b_rec["train_samples"]) == (50, 25)
    assert manifest["splits"]["train"]["samples"] == 205 and manifest["splits"]["val"]["samples"] == 20


def test_packed_loss_equals_the_mean_of_unpacked_losses(tmp_path, tiny_model_dir):
    """Chat samples packed into rows: with boundaries honoured, the packed batch's mean token loss
    is the token-weighted mean of the same samples' losses run one by one."""
    from tunedag.models.loading import load_causal_lm
    from tunedag.data.batches import collate, trained_token_count
    from tunedag.models.batch_inputs import loss_sum, model_inputs

    _run(tmp_path, tiny_model_dir, rows=chats(80), ds={"type": "sharegpt"}, sequence_len=96)
    reader = ShardReader(tmp_path / "packed/train")
    rows = [reader.row(i) for i in range(3)]
    model = load_causal_lm(tiny_model_dir).eval()
    with torch.no_grad():
        batch = collate(rows, pad_id=0)
        packed = loss_sum(model(**model_inputs(batch, torch.device("cpu"), torch.float32)).logits, batch["labels"])
        packed_mean = packed / trained_token_count(batch["labels"])
        sums, counts = [], []
        for row in rows:
            assert len(row["cu_seqlens"]) > 2
            for a, b in zip(row["cu_seqlens"], row["cu_seqlens"][1:]):
                ids = torch.from_numpy(row["input_ids"][a:b].astype("int64"))[None]
                labels = torch.from_numpy(row["labels"][a:b].astype("int64"))[None]
                sums.append(loss_sum(model(input_ids=ids).logits, labels))
                counts.append(trained_token_count(labels))
    # fp32 on CPU: the same matmuls in a different batch shape differ by rounding only
    torch.testing.assert_close(packed_mean, sum(sums) / sum(counts), rtol=1e-5, atol=1e-6)


def test_dpo_shards_keep_pairs_and_their_labels(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"fox {i}", "chosen": "owl", "rejected": "cat dog"} for i in range(30)]
    _, manifest = _run(tmp_path, tiny_model_dir, rows=rows, ds={"type": "dpo"}, val_set_size=3)
    assert manifest["objective"] == "dpo" and "segment_labels" in manifest["columns"]
    row = ShardReader(tmp_path / "packed/train").row(0)
    assert row["segment_labels"].tolist() == [1, 0] * (len(row["cu_seqlens"]) // 2)
    assert manifest["splits"]["train"]["samples"] == 27


def test_completion_documents_are_split_and_counted(tmp_path, tiny_model_dir):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 8} for _ in range(12)]
    _, manifest = _run(tmp_path, tiny_model_dir, rows=rows, ds={"type": "completion"}, sequence_len=32,
                       val_set_size=2)
    assert manifest["counts"]["documents_split"] == 12
    reader = ShardReader(tmp_path / "packed/train")
    assert all(len(reader.row(i)["input_ids"]) <= 32 for i in range(len(reader)))


@pytest.mark.parametrize("strategy, dropped, truncated", [("drop", 3, 0), ("truncate", 0, 3)])
def test_excess_length_strategy_counts(tmp_path, tiny_model_dir, strategy, dropped, truncated):
    rows = sample_rows(40)
    for r in rows[:3]:
        r["input"] = "fox " * 200
    _, manifest = _run(tmp_path, tiny_model_dir, rows=rows, excess_length_strategy=strategy, val_set_size=1)
    assert (manifest["counts"]["too_long_dropped"], manifest["counts"]["too_long_truncated"]) == (dropped, truncated)
    # truncation cuts the answer off these prompts: nothing left to train, so they are dropped too
    assert manifest["counts"]["no_trained_tokens_dropped"] == truncated


def test_excess_length_raise_names_the_row(tmp_path, tiny_model_dir):
    rows = sample_rows(40)
    rows[5]["input"] = "fox " * 200
    with pytest.raises(TokenizeError, match=r"src\.jsonl\): line 6: sample of \d+ tokens is longer than sequence_len 128"):
        _run(tmp_path, tiny_model_dir, rows=rows, excess_length_strategy="raise")
    assert not (tmp_path / "packed").exists()


def test_a_changed_template_changes_the_code_hash(tmp_path, monkeypatch):
    before = code_hash()
    templates = tmp_path / "templates"
    shutil.copytree(chat.TEMPLATE_DIR, templates)
    monkeypatch.setattr(chat, "TEMPLATE_DIR", templates)
    assert code_hash() == before
    (templates / "chatml.jinja").write_text((templates / "chatml.jinja").read_text().replace("<|im_end|>", "<|end|>"))
    assert code_hash() != before  # the manifest's code_hash and tokenize.smk's param both change


def test_a_changed_tokenizer_template_changes_the_tokenizer_hash(tmp_path):
    a = save_word_tokenizer(tmp_path / "a", chat.named_template("chatml"))
    b = save_word_tokenizer(tmp_path / "b", chat.named_template("qwen"))
    assert tokenize.tokenizer_hash(a) != tokenize.tokenizer_hash(b)


# --------------------------------------------------------------------------- bad input

def test_val_set_larger_than_data_is_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(TokenizeError, match="val_set_size 10.0 leaves no training rows .*10 rows"):
        _run(tmp_path, tiny_model_dir, rows=sample_rows(10), val_set_size=10)
    assert not (tmp_path / "packed").exists()


def test_malformed_row_names_file_and_row_and_leaves_no_output(tmp_path, tiny_model_dir):
    rows = sample_rows(20)
    del rows[7]["output"]
    with pytest.raises(RowFormatError, match=r"raw/src/data\.parquet \(source .*src\.jsonl\): line 8: missing field 'output'"):
        _run(tmp_path, tiny_model_dir, rows=rows)
    assert not (tmp_path / "packed").exists()
    _, manifest = _run(tmp_path, tiny_model_dir, rows=rows, on_bad_rows="skip", val_set_size=2)
    assert manifest["counts"]["bad_rows_skipped"] == 1 and manifest["splits"]["train"]["samples"] == 17


@pytest.mark.parametrize("line, message", [
    ('{"instruction": oops}', r"src\.jsonl: line 3: invalid JSON"),
    ('{"instruction": "a", "output": ["x"]}', r"src\.jsonl: line 3: field 'output' is list, other rows have str"),
    ('[1, 2]', r"src\.jsonl: line 3: expected an object, got list"),
])
def test_rows_the_download_sets_aside_raise_or_are_skipped(tmp_path, tiny_model_dir, line, message):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(2)) + line + "\n" +
                   "".join(json.dumps(r) + "\n" for r in sample_rows(20, seed=1)))
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw/src")
    with pytest.raises(RowFormatError, match=message):
        tokenize_with_model(tiny_run(src), [tmp_path / "raw/src"], tiny_model_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    manifest = tokenize_with_model(tiny_run(src, on_bad_rows="skip", val_set_size=2), [tmp_path / "raw/src"],
                                   tiny_model_dir, tmp_path / "packed")
    assert manifest["counts"]["bad_rows_skipped"] == 1 and manifest["counts"]["rows"] == 23


def test_row_numbers_count_the_rows_the_download_set_aside(tmp_path):
    """Parquet row 5 (from 0) is source line 7 (from 1) when source line 3 was set aside: errors
    use the source's numbers."""
    job = tokenize.DatasetJob(0, "src", "src.jsonl", tmp_path / "data.parquet", None, 1.0, gaps=[2, 9],
                              numbering="line")
    assert [job.where(i).rsplit(": ", 1)[1] for i in (0, 1, 2, 5, 7, 8)] == \
        ["line 1", "line 2", "line 4", "line 7", "line 9", "line 11"]


@pytest.mark.parametrize("ds, rows, message", [
    ({"type": "chat_template"}, [{"messages": []}] * 5, r"line 1: field 'messages' is an empty conversation"),
    ({"type": "sharegpt"}, [{"conversations": [{"from": "bot", "value": "x"}]}] * 5,
     r"line 1: field 'conversations\[0\].from': unknown role 'bot'"),
    ({"type": "alpaca", "field_output": "answer"}, sample_rows(5), r"line 1: missing field 'answer'"),
])
def test_bad_chat_rows_name_row_and_field(tmp_path, tiny_model_dir, ds, rows, message):
    with pytest.raises(RowFormatError, match=message):
        _run(tmp_path, tiny_model_dir, rows=rows, ds=ds, val_set_size=1)
    assert not (tmp_path / "packed").exists()


def test_empty_dataset_is_an_error(tmp_path, tiny_model_dir):
    src = _prepare(tmp_path, sample_rows(3))
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), tmp_path / "raw/src/data.parquet")
    with pytest.raises(TokenizeError, match=r"dataset 'src' has no rows"):
        tokenize_with_model(tiny_run(src), [tmp_path / "raw/src"], tiny_model_dir, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_tokenizer_without_chat_template_is_an_error_unless_one_is_named(tmp_path):
    model = save_word_tokenizer(tmp_path / "tok")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 10
    with pytest.raises(TokenizeError, match=r"the tokenizer has no chat template, which dataset 'src' \(type chat_template\) needs"):
        _run(tmp_path, model, rows=rows, ds={"type": "chat_template"})
    assert not (tmp_path / "packed").exists()
    _, manifest = _run(tmp_path, model, rows=rows, ds={"type": "chat_template"}, chat_template="chatml", val_set_size=1)
    assert manifest["splits"]["train"]["samples"] == 9


def test_sft_and_preference_data_cannot_be_mixed(tmp_path, tiny_model_dir):
    a = _prepare(tmp_path, sample_rows(10), "a")
    run = tiny_run(a, datasets=[{"path": str(a)}, {"path": str(a), "name": "b", "type": "dpo"}])
    with pytest.raises(TokenizeError, match="cannot be mixed in one run"):
        tokenize_with_model(run, [tmp_path / "raw/a", tmp_path / "raw/a"], tiny_model_dir, tmp_path / "packed")


def test_invalid_utf8_raises_naming_file_line_and_offset_or_is_skipped(tmp_path, tiny_model_dir):
    src = tmp_path / "src.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in sample_rows(20))
    src.write_bytes(b'{"instruction": "caf\xe9"}\n' + good.encode())
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw/src")
    with pytest.raises(RowFormatError) as err:
        tokenize_with_model(tiny_run(src), [tmp_path / "raw/src"], tiny_model_dir, tmp_path / "packed")
    assert str(err.value) == (f"{src}: line 1: invalid UTF-8 at byte offset 20 (0xe9) "
                              f"(set on_bad_rows: skip to skip and count such rows)")
    assert not (tmp_path / "packed").exists()
    manifest = tokenize_with_model(tiny_run(src, on_bad_rows="skip", val_set_size=2), [tmp_path / "raw/src"],
                                   tiny_model_dir, tmp_path / "packed")
    assert manifest["counts"]["bad_rows_skipped"] == 1 and manifest["counts"]["rows"] == 21


@pytest.mark.parametrize("row, message", [
    ({"instruction": "hi"}, "line 3: missing field 'output'"),
    ({"instruction": "hi", "output": None}, "line 3: field 'output' is null"),
])
def test_a_null_field_is_not_reported_missing(tmp_path, tiny_model_dir, row, message):
    """Parquet stores an absent field as null; the download's source.json says which it was."""
    rows = sample_rows(2) + [row] + sample_rows(5, seed=1)
    src = _prepare(tmp_path, rows)
    with pytest.raises(RowFormatError) as err:
        tokenize_with_model(tiny_run(src), [tmp_path / "raw/src"], tiny_model_dir, tmp_path / "packed")
    assert str(err.value) == f"{tmp_path}/raw/src/data.parquet (source {src}): {message}"
    assert not (tmp_path / "packed").exists()


def test_dpo_pair_with_identical_responses_raises_or_is_skipped_and_counted(tmp_path, tiny_model_dir):
    """Such a pair teaches nothing (zero DPO gradient): tokenize never writes it."""
    rows = [{"prompt": f"fox {i}", "chosen": "owl", "rejected": "cat dog"} for i in range(30)]
    rows[4]["rejected"] = "owl"
    with pytest.raises(RowFormatError) as err:
        _run(tmp_path, tiny_model_dir, rows=rows, ds={"type": "dpo"}, val_set_size=3)
    assert str(err.value) == (f"{tmp_path}/raw/src/data.parquet (source {tmp_path}/src.jsonl): line 5: chosen and "
                              f"rejected responses are the same tokens, so there is nothing to prefer (set "
                              f"on_bad_rows: skip to skip and count such pairs)")
    assert not (tmp_path / "packed").exists()
    _, manifest = _run(tmp_path, tiny_model_dir, rows=rows, ds={"type": "dpo"}, val_set_size=3, on_bad_rows="skip")
    assert manifest["counts"]["identical_pairs_skipped"] == 1
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 29
