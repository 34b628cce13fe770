"""type: stepwise_supervised: exact ids and step labels, as Axolotl's stepwise_supervised strategy (TRL's
PRMTrainer) tokenizes math_shepherd rows, against ids written by hand (tests/data/wordtok.py)."""
import re

import pytest

from tunedag.config import DatasetConfig
from tunedag.data.formats import PLANNERS, FormatSpec, RowFormatError, TextTokenizer, encode_plans
from tests.data.wordtok import ids, word_tokenizer

M = -100
ROW = {"prompt": "hi x", "completions": ["a b", "c", "z y"], "labels": [True, False, True]}


def encode(row, **keys):
    tok = TextTokenizer.from_hf(word_tokenizer())
    ds = DatasetConfig(path="steps.jsonl", type="stepwise_supervised", **keys)
    spec = FormatSpec.from_dataset(ds, tok, None, 512, train_on_inputs=False)
    (sample,) = encode_plans([PLANNERS[ds.type](row, spec, tok)], tok, spec)[0]
    return sample


def test_each_step_is_labelled_on_its_separator_and_nothing_else_is():
    s = encode(ROW, step_separator=" : ")
    assert s.input_ids == ids("<s> hi x a b : c : z y :")
    assert s.labels == [M, M, M, M, M, 1, M, 0, M, M, 1]


def test_a_separator_of_no_tokens_puts_the_label_on_the_steps_last_token():
    s = encode(ROW)  # "\n": no token in the word tokenizer
    assert s.input_ids == ids("<s> hi x a b c z y")
    assert s.labels == [M, M, M, M, 1, 0, M, 1]


def test_train_on_last_step_only_keeps_the_last_label():
    s = encode(ROW, step_separator=":", train_on_last_step_only=True)
    assert s.labels == [M] * 10 + [1]


def test_max_completion_length_cuts_the_step_tokens_not_the_prompt():
    s = encode(ROW, step_separator=":", max_completion_length=4)
    assert s.input_ids == ids("<s> hi x a b : c")
    assert s.labels == [M, M, M, M, M, 1, M]


def test_the_first_token_keeps_its_label_nothing_is_shifted():
    s = encode({"prompt": "", "completions": ["c"], "labels": [0]}, step_separator="")
    assert s.input_ids == ids("<s> c") and s.labels == [M, 0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "completions": ["a", "b"], "labels": [True]}, "2 steps but 1 labels"),
    ({"prompt": "hi", "completions": [], "labels": []}, "'completions' is empty"),
    ({"prompt": "hi", "completions": ["a"], "labels": ["yes"]}, "'labels[0]' must be true or false"),
    ({"prompt": "hi", "completions": [3], "labels": [1]}, "'completions[0]' must be a string"),
    ({"completions": ["a"], "labels": [1]}, "prompt"),
])
def test_bad_rows_name_the_field(row, message):
    with pytest.raises(RowFormatError, match=re.escape(message)):
        encode(row)


def test_tokenize_cuts_long_rows_at_sequence_len_and_writes_prm_shards(tmp_path, tiny_model_dir):
    """As Axolotl's strategy: a row past sequence_len is cut there, even under excess_length_strategy: drop."""
    from tunedag.data.download import download_dataset
    from tunedag.data.shards import ShardReader
    from tests.helpers import tiny_run, tokenize_with_model, write_jsonl

    rows = [{"prompt": "Which is right?", "completions": [f"step {k} " + "word " * 6 for k in range(6)],
             "labels": [k % 2 == 0 for k in range(6)]} for _ in range(8)]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src), type="stepwise_supervised"), tmp_path / "raw")
    run = tiny_run(src, datasets=[{"path": str(src), "type": "stepwise_supervised"}], rl="prm", sequence_len=32,
                   val_set_size=0.25, excess_length_strategy="drop")
    manifest = tokenize_with_model(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    assert manifest["objective"] == "prm" and "segment_labels" not in manifest["columns"]
    assert manifest["counts"]["too_long_truncated"] == 8 and manifest["counts"]["too_long_dropped"] == 0
    reader = ShardReader(tmp_path / "packed/train")
    for row in (reader.row(i) for i in range(len(reader))):
        assert len(row["input_ids"]) <= 32 * 6  # packed rows of samples of at most 32 tokens
        assert all(n <= 32 for n in (row["cu_seqlens"][1:] - row["cu_seqlens"][:-1]))
        assert set(row["labels"].tolist()) <= {-100, 0, 1} and 1 in row["labels"]  # the first step's label kept
