"""Shards are checked against the sha256 values manifest.json records before train or evaluate
reads them: a truncated, overwritten, extra or missing shard stops the stage with one line."""
import dataclasses
import re
import shutil

import pytest

from tunedag.data.shards import ShardIntegrityError, ShardReader, verify_shards
from tunedag.evaluate.compare import evaluate_run
from tunedag.io import sha256_file
from tunedag.train.loop import train
from tests.helpers import tiny_run

RERUN = "rerun tokenize (snakemake --forcerun tokenize)"


@pytest.fixture
def shards(sample_shards, tmp_path):
    """A private copy of the session's packed shards (with its run), free to damage."""
    src, packed = sample_shards
    shutil.copytree(packed, tmp_path / "packed")
    return tiny_run(src, max_steps=1), tmp_path / "packed"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one token id changed: pyarrow would read it happily
    path.write_bytes(bytes(data))


def _expected(path, before):
    return (f"{path}: sha256 {sha256_file(path)}, but manifest.json records {before}: the shard changed after "
            f"tokenize wrote it (truncated or overwritten?); {RERUN}")


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_a_changed_shard_stops_training_naming_it(shards, tiny_model_dir, tmp_path, damage):
    run, packed = shards
    shard = packed / "train/shard-00000.arrow"
    before = sha256_file(shard)
    damage(shard)
    with pytest.raises(ShardIntegrityError, match=f"^{re.escape(_expected(shard, before))}$"):
        train(run, packed, tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run/adapter").exists()


def test_a_missing_shard_stops_training(shards, tiny_model_dir, tmp_path):
    run, packed = shards
    shard = packed / "train/shard-00000.arrow"
    before = sha256_file(shard)
    shard.unlink()
    message = f"{shard}: missing (manifest.json lists it with sha256 {before}); {RERUN}"
    with pytest.raises(ShardIntegrityError, match=f"^{re.escape(message)}$"):
        train(run, packed, tiny_model_dir, tmp_path / "run")


def test_an_unlisted_shard_stops_training(shards, tiny_model_dir, tmp_path):
    """A shard left by another tokenize run (say a partial copy) would be read as training data."""
    run, packed = shards
    extra = packed / "train/shard-00099.arrow"
    shutil.copy(packed / "train/shard-00000.arrow", extra)
    message = (f"{extra}: not listed in manifest.json (1 unlisted shard(s)), so it was not written by the tokenize "
               f"run that made the others; {RERUN}")
    with pytest.raises(ShardIntegrityError, match=f"^{re.escape(message)}$"):
        train(run, packed, tiny_model_dir, tmp_path / "run")


def test_a_changed_validation_shard_stops_evaluate(shards, tiny_model_dir, tmp_path):
    run, packed = shards
    shard = packed / "val/shard-00000.arrow"
    before = sha256_file(shard)
    _truncate(shard)
    with pytest.raises(ShardIntegrityError, match=f"^{re.escape(_expected(shard, before))}$"):
        evaluate_run(run, tiny_model_dir, tiny_model_dir, packed, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_intact_shards_pass_and_an_unreadable_one_is_named_by_the_reader(shards):
    """verify_shards is quiet on what tokenize wrote; the reader itself names a damaged file
    (for callers that read shards without a manifest) instead of a pyarrow traceback."""
    import json

    _, packed = shards
    manifest = json.loads((packed / "manifest.json").read_text())
    verify_shards(packed / "train", manifest)
    verify_shards(packed / "val", manifest)
    shard = packed / "train/shard-00000.arrow"
    _truncate(shard)
    with pytest.raises(ShardIntegrityError, match=rf"^{re.escape(str(shard))}: not a readable Arrow shard .*{re.escape(RERUN)}$"):
        ShardReader(packed / "train")
