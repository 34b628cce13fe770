"""Axolotl's data order and deduplication: sample_packing_sequentially (next-fit in order),
curriculum_sampling (no shuffling, packed and trained in dataset order), a source listed twice, and
dataset_exact_deduplication (first occurrences kept across datasets, then across train and val)."""
import json

import numpy as np
import pytest

from tunedag.config import ConfigError, parse_config
from tunedag.data import packing, tokenize
from tunedag.data.shards import ShardReader
from tunedag.train import checkpoint as ckpt
from tunedag.train.loop import micro_batches
from tests.data.test_tokenize import _prepare
from tests.helpers import sample_rows, tiny_run, tokenize_with_model


def test_next_fit_keeps_the_order_and_opens_a_row_when_the_next_sample_does_not_fit():
    order, bins = packing.next_fit(np.array([3, 4, 2, 5, 1, 1]), 6, None)
    assert order.tolist() == [0, 1, 2, 3, 4, 5] and bins.tolist() == [0, 1, 1, 2, 2, 3]
    order, bins = packing.next_fit(np.array([3, 4, 2, 5, 1, 1]), 6, 7)  # a seeded order, packed next-fit
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert np.all(np.diff(bins) >= 0)
    order, _ = packing.first_fit_decreasing(np.array([2, 3, 2, 3]), 6, None)  # unseeded: ties keep their order
    assert order.tolist() == [1, 3, 0, 2]


def _samples(split_dir, order=None) -> list[tuple[int, ...]]:
    """The split's samples (their token ids) row by row, in ``order`` (default: shard order)."""
    reader = ShardReader(split_dir)
    out = []
    for i in order if order is not None else range(reader.num_rows):
        row = reader.row(i)
        cu = row["cu_seqlens"].tolist()
        out += [tuple(row["input_ids"][a:b].tolist()) for a, b in zip(cu, cu[1:])]
    return out


def _tokenize(tmp_path, model, datasets, out, **keys):
    run = tiny_run(datasets[0]["path"], datasets=datasets, **keys)
    raw = [tmp_path / "raw" / ds.dataset_name for ds in run.datasets]
    return run, tokenize_with_model(run, raw, model, tmp_path / out)


def test_curriculum_sampling_packs_next_fit_in_dataset_order_and_trains_in_that_order(tmp_path, tiny_model_dir):
    a, b = _prepare(tmp_path, sample_rows(100, seed=1), "a"), _prepare(tmp_path, sample_rows(20, seed=2), "b")
    datasets = [{"path": str(a)}, {"path": str(b)}]
    keys = {"val_set_size": 1, "curriculum_sampling": True}
    run, manifest = _tokenize(tmp_path, tiny_model_dir, datasets, "seq", sample_packing_sequentially=True, **keys)
    _tokenize(tmp_path, tiny_model_dir, datasets, "one", sample_packing=False, **keys)
    in_order = _samples(tmp_path / "one/train")  # one sample a row, as the data has them, dataset a then b
    assert len(in_order) == manifest["splits"]["train"]["samples"] == 118
    reader = ShardReader(tmp_path / "seq/train")
    rows = [reader.row(i)["input_ids"].tolist() for i in range(reader.num_rows)]
    expected, at = [], 0
    for record in manifest["datasets"]:  # next-fit over each dataset's samples (one unit each)
        group = in_order[at:at + record["train_samples"]]
        _, bins = packing.next_fit(np.array([len(s) for s in group]), run.sequence_len, None)
        expected += [sum((list(s) for s, b in zip(group, bins) if b == r), []) for r in range(bins[-1] + 1)]
        at += len(group)
    assert rows == expected
    batches = [batch for batch, _, _ in micro_batches(reader, run, 0, ckpt.Position())]
    trained = [batch["input_ids"][k, :len(rows[i])].tolist()
               for i, (batch, k) in enumerate((b, k) for b in batches for k in range(b["input_ids"].shape[0]))]
    assert trained == rows  # read in shard order, no shuffling
    shuffled = tiny_run(a, datasets=datasets, val_set_size=1)  # without curriculum_sampling rows are shuffled
    first = next(micro_batches(reader, shuffled, 0, ckpt.Position()))[0]
    assert first["input_ids"][0, :len(rows[0])].tolist() != rows[0]
    _, ffd = _tokenize(tmp_path, tiny_model_dir, datasets, "ffd", **keys)  # first-fit-decreasing: other rows
    assert sorted(_samples(tmp_path / "ffd/train")) == sorted(in_order) != _samples(tmp_path / "ffd/train")


def _distinct(rows: list[dict]) -> int:
    return len({json.dumps(r, sort_keys=True) for r in rows})


def test_a_source_listed_twice_trains_both_copies_and_shares_its_download(tmp_path, tiny_model_dir):
    src = _prepare(tmp_path, sample_rows(40, seed=3), "src")
    run, manifest = _tokenize(tmp_path, tiny_model_dir, [{"path": str(src)}, {"path": str(src)}], "twice",
                              val_set_size=2)
    assert [ds.dataset_name for ds in run.datasets] == ["src", "src"]
    assert manifest["splits"]["train"]["samples"] == 76 and manifest["splits"]["val"]["samples"] == 4
    assert "duplicates_dropped" not in manifest["counts"]
    with pytest.raises(ConfigError, match=r"two different sources are named 'src' .*; set name: on one"):
        other = _prepare(tmp_path / "elsewhere", sample_rows(5), "src")
        tiny_run(src, datasets=[{"path": str(src)}, {"path": str(other)}])


def test_exact_deduplication_keeps_each_sample_once_across_datasets_train_and_val(tmp_path, tiny_model_dir):
    rows = sample_rows(40, seed=3)
    rows += rows[:6]  # duplicates inside the data too
    src = _prepare(tmp_path, rows, "src")
    datasets = [{"path": str(src), "weight": 2.0}, {"path": str(src)}]
    _, manifest = _tokenize(tmp_path, tiny_model_dir, datasets, "dedup", val_set_size=3,
                            dataset_exact_deduplication=True)
    train, val = _samples(tmp_path / "dedup/train"), _samples(tmp_path / "dedup/val")
    unique = _distinct(rows)
    assert len(set(train)) + len(val) == len(set(train + val)) == unique  # every row once, in train or val
    assert val  # kept where it first occurs: the first copy's held-out rows stay held out
    first, second = (d["train_samples"] for d in manifest["datasets"])
    assert first + second == len(train) and first % 2 == 0
    assert len(train) - len(set(train)) == first // 2  # the first copy's weight 2 repeats each sample it keeps
    counts = manifest["counts"]
    assert counts["duplicates_dropped"] == 2 * len(rows) - unique
    assert (counts["train_samples"], counts["val_samples"]) == (len(train), len(val))
    assert sum(d.get("duplicates_dropped", 0) for d in manifest["datasets"]) == counts["duplicates_dropped"]
    assert manifest["splits"]["train"]["samples"] == len(train) and manifest["dataset_exact_deduplication"]
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "dedup/val_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == len(set(prompts)) == len(val)  # evaluation never generates from a dropped repeat


def test_exact_deduplication_of_preference_pairs(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"fox {i % 12}", "chosen": "owl", "rejected": "cat dog"} for i in range(30)]
    src = _prepare(tmp_path, rows, "pairs")
    _, manifest = _tokenize(tmp_path, tiny_model_dir, [{"path": str(src), "type": "dpo"}], "dpo", val_set_size=2,
                            dataset_exact_deduplication=True)
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 12
    row = ShardReader(tmp_path / "dpo/train").row(0)
    assert row["segment_labels"].tolist() == [1, 0] * (len(row["cu_seqlens"]) // 2)


# Axolotl's examples/llama-3/lora-1b-deduplicate-dpo.yml: its datasets and dedup as written, a LoRA on the built-in
# model, the hub dataset replaced by rows of its shape
DEDUP_DPO = """
base_model: builtin:tiny-llama
model_type: LlamaForCausalLM
chat_template: llama3
rl: dpo
adapter: lora
datasets:
""" + 2 * """
  - path: pairs.jsonl
    type: chat_template.default
    field_messages: conversation
    field_chosen: chosen
    field_rejected: rejected
    message_property_mappings:
      role: role
      content: content
    roles:
      system:
        - system
      user:
        - user
      assistant:
        - assistant
""" + """
dataset_exact_deduplication: true
val_set_size: 0.1
sequence_len: 512
"""


@pytest.mark.parametrize("dedup, samples", [(True, 15), (False, 40)])
def test_axolotls_dedup_dpo_example_keeps_each_pair_once_or_trains_both_copies(tmp_path, tiny_model_dir, dedup,
                                                                              samples):
    rows = [{"conversation": [{"role": "user", "content": f"fox {i % 15}"}],
             "chosen": {"role": "assistant", "content": "owl"}, "rejected": {"role": "assistant", "content": "cat"}}
            for i in range(20)]
    _prepare(tmp_path, rows, "pairs")
    (tmp_path / "dpo.yml").write_text(DEDUP_DPO.replace("dataset_exact_deduplication: true",
                                                        f"dataset_exact_deduplication: {str(dedup).lower()}"))
    config = parse_config({"runs": {"r": {"axolotl": "dpo.yml"}}}, base_dir=tmp_path)
    run = config.runs["r"]
    assert [ds.dataset_name for ds in run.datasets] == ["pairs", "pairs"] and run.dataset_exact_deduplication == dedup
    manifest = tokenize_with_model(run, [tmp_path / "raw/pairs"] * 2, tiny_model_dir, tmp_path / "packed")
    assert manifest["objective"] == "dpo"
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == samples


@pytest.mark.parametrize("keys, expect", [  # the keys of Axolotl's examples these data options come from
    ("sample_packing: true\nsample_packing_sequentially: true\ncurriculum_sampling: true\n"
     "datasets:\n  - {path: rows.jsonl, type: alpaca}\n  - {path: rows.jsonl, type: alpaca}",  # llama-3 sequentially
     lambda run: run.curriculum_sampling and run.sample_packing_sequentially and len(run.datasets) == 2),
    ("datasets:\n  - {path: rows.jsonl, type: chat_template, drop_system_message: true, field_messages: conversations,"
     " message_property_mappings: {role: from, content: value}}",  # gemma2/qlora.yml
     lambda run: run.datasets[0].drop_system_message and run.datasets[0].field_messages == "conversations"),
    ("datasets:\n  - {path: rows.jsonl, type: 'alpaca:phi'}",  # phi/phi3-ft.yml
     lambda run: (run.datasets[0].type, run.datasets[0].alpaca_style) == ("alpaca", "phi")),
    ("rl: orpo\nchat_template: chatml\ndatasets:\n  - {path: rows.jsonl, type: chat_template.argilla}",  # orpo
     lambda run: (run.rl, run.datasets[0].type, run.datasets[0].field_prompt) == ("orpo", "dpo", "prompt")),
])
def test_axolotls_data_options_become_tunedag_keys(tmp_path, keys, expect):
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "a.yml").write_text(f"base_model: builtin:tiny-llama\nadapter: lora\n{keys}\n")
    assert expect(parse_config({"runs": {"r": {"axolotl": "a.yml"}}}, base_dir=tmp_path).runs["r"])
