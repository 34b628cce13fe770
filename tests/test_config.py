"""config.yaml validation: each kind of error names the key and value at fault."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_run, write_jsonl
from tunedag.config import DatasetConfig, ConfigError, json_schema, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return {"defaults": {"sequence_len": 128},
            "runs": {"demo": {"base_model": "builtin:tiny-llama",
                              "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}}}


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="config.yaml")
    return str(err.value)


def test_valid_config_merges_defaults(raw):
    config = parse_config(raw)
    run = config.runs["demo"]
    assert run.sequence_len == 128 and run.lora_r == 16
    assert run.datasets[0].dataset_name == "data"
    assert config.run_dir("demo") == "runs/demo"


@pytest.mark.parametrize("path, name", [
    ("hf:yahma/alpaca-cleaned", "alpaca-cleaned"), ("hf:yahma/alpaca-cleaned@train", "alpaca-cleaned"),
    ("hf:yahma/alpaca-cleaned@train[:95%]", "alpaca-cleaned-train-95"), ("hf:allenai/c4:en@validation", "c4-en-validation"),
    ("data/rows.jsonl.gz", "rows")])
def test_a_datasets_folder_name_tells_slices_of_one_source_apart(path, name):
    """Two runs may read the whole of a hub split and a slice of it: each gets its own data/raw folder."""
    assert DatasetConfig(path=path).dataset_name == name


def test_unknown_key_names_the_closest_valid_key(raw):
    raw["runs"]["demo"]["lora_rank"] = 8
    assert error_of(raw) == "config.yaml: runs.demo: unknown key 'lora_rank' (did you mean 'lora_r'?)"


def test_unknown_key_in_defaults_is_reported_there(raw):
    raw["defaults"]["learnig_rate"] = 1e-4
    assert error_of(raw) == "config.yaml: defaults: unknown key 'learnig_rate' (did you mean 'learning_rate'?)"


def test_wrong_type_names_key_and_value(raw):
    raw["runs"]["demo"]["learning_rate"] = "fast"
    assert error_of(raw) == ("config.yaml: runs.demo.learning_rate: expected a number, got 'fast' "
                             "(a string that is not one)")


def test_numbers_written_as_strings_are_numbers_and_null_is_unset(raw):
    raw["runs"]["demo"].update(learning_rate="2e-5", lora_r="8", lora_alpha=None, num_epochs=None)
    run = parse_config(raw).runs["demo"]
    assert (run.learning_rate, run.lora_r, run.num_epochs) == (2e-5, 8, 1)
    assert run.lora_alpha == 32


def test_bool_is_not_an_integer(raw):
    raw["runs"]["demo"]["micro_batch_size"] = True
    assert "runs.demo.micro_batch_size: expected an integer, got True (bool)" in error_of(raw)


def test_invalid_choice_suggests_the_valid_one(raw):
    raw["runs"]["demo"]["lr_scheduler"] = "cosin"
    assert error_of(raw) == ("config.yaml: runs.demo.lr_scheduler: 'cosin' is not one of 'cosine', "
                             "'linear', 'constant' (did you mean 'cosine'?)")


def test_missing_dataset_file_names_key_and_path(raw):
    raw["runs"]["demo"]["datasets"][0]["path"] = "missing.jsonl"
    assert error_of(raw) == "config.yaml: runs.demo.datasets[0].path: file not found: 'missing.jsonl'"


def test_missing_required_key(raw):
    del raw["runs"]["demo"]["base_model"]
    assert error_of(raw).startswith("config.yaml: runs.demo: missing required key 'base_model'")


def test_url_source_needs_sha256(raw):
    raw["runs"]["demo"]["datasets"][0]["path"] = "https://example.org/d.jsonl"
    assert error_of(raw) == ("config.yaml: runs.demo.datasets[0].sha256: required for the URL "
                             "'https://example.org/d.jsonl'")


def test_unknown_builtin_model(raw):
    raw["runs"]["demo"]["base_model"] = "builtin:huge"
    assert "runs.demo.base_model: unknown built-in model 'builtin:huge'" in error_of(raw)


def test_unknown_top_level_key(raw):
    raw["run"] = {}
    assert error_of(raw) == "config.yaml: unknown top-level key 'run' (did you mean 'runs'?)"


def test_out_of_range_value(raw):
    raw["runs"]["demo"]["micro_batch_size"] = 0
    assert error_of(raw) == "config.yaml: runs.demo.micro_batch_size: must be at least 1, got 0"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_stage_hash_changes_only_for_keys_the_stage_reads(raw):
    before = parse_config(raw).runs["demo"]
    raw["runs"]["demo"]["learning_rate"] = 1e-3
    after = parse_config(raw).runs["demo"]
    assert before.stage_hash("train") != after.stage_hash("train")
    assert before.stage_hash("tokenize") == after.stage_hash("tokenize")


def test_schema_file_is_generated_from_the_typed_config():
    on_disk = json.loads((REPO / "workflow/schemas/config.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), \
        "regenerate: python -m tunedag.config > workflow/schemas/config.schema.json"


def test_snakemake_exits_nonzero_on_a_bad_config(raw, tmp_path):
    raw["runs"]["demo"]["lora_rank"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n",
                           "--configfile", "bad.yaml", "--cores", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown key 'lora_rank' (did you mean 'lora_r'?)" in proc.stdout + proc.stderr


def test_full_fine_tuning_is_a_run_without_adapter(raw):
    raw["runs"]["demo"].update(adapter=None, unfrozen_parameters=["^lm_head"], lora_r=7)  # lora_r: unused, not checked
    run = parse_config(raw).runs["demo"]
    assert run.adapter is None and run.unfrozen_parameters == ["^lm_head"]


def test_hub_revisions_pin_data_and_models_and_apply_to_the_hub_only(tmp_path):
    from tunedag.models.loading import model_dir

    src = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    pinned = tiny_run(src, base_model="meta-llama/Llama-3.1-8B", base_model_revision="0e9e39f",
                      datasets=[{"path": "hf:tatsu-lab/alpaca", "revision": "dce01c9"}])
    assert pinned.datasets[0].revision == "dce01c9"
    assert model_dir(pinned.base_model, pinned.base_model_revision) == Path("models/hub/meta-llama--Llama-3.1-8B@0e9e39f")
    assert model_dir(pinned.base_model) == Path("models/hub/meta-llama--Llama-3.1-8B")
    with pytest.raises(ConfigError, match=r"datasets\[0\].revision: applies to hf: sources only"):
        tiny_run(src, datasets=[{"path": str(src), "revision": "main"}])
    with pytest.raises(ConfigError, match="base_model_revision: applies to hub models only"):
        tiny_run(src, base_model_revision="main")
    with pytest.raises(ConfigError, match="base_model_revision: 'refs/pr/1' is not"):
        tiny_run(src, base_model="org/model", base_model_revision="refs/pr/1")


def test_the_download_rerun_key_holds_what_the_download_depends_on():
    """download.smk reruns on a change of this key: revision and name too, and the counted field when streamed."""
    base = DatasetConfig(path="hf:org/data@train", max_words=100, field="text")
    key = base.download_identity()
    assert key == {"path": "hf:org/data@train", "max_words": 100, "field": "text"}
    for changed in (dict(revision="v2"), dict(name="mine"), dict(field="body"), dict(max_words=200)):
        assert DatasetConfig(**{**dataclasses.asdict(base), **changed}).download_identity() != key, changed
    unbounded = DatasetConfig(path="hf:org/data@train", field="text")
    assert unbounded.download_identity() == {"path": "hf:org/data@train"}  # the field matters only when counted
