"""Axolotl configs as written: each key translated, accepted with a note, or refused saying what tunedag
does instead; every problem of a config reported at once; --configfile replacing config.yaml."""
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunedag.config import ConfigError, DatasetConfig, RunConfig, effective_config, load_config, parse_config
from tunedag.config.axolotl import AXOLOTL_ONLY
from tunedag.config.axolotl_keys import (DATASET_REFUSED_KEYS, DATASET_TRANSLATED, IGNORED_KEYS, REFUSED_KEYS,
                                        TRANSLATED)
from tunedag.train.loop import save_interval, warmup_steps

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).parent / "axolotl_configs"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(EXAMPLES, "axolotl")
    Path("data").mkdir()
    Path("data/alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return tmp_path


def run_of(file: str, **inline) -> tuple[RunConfig, list[str]]:
    config = parse_config({"runs": {"r": {"axolotl": f"axolotl/{file}", **inline}}}, source="c.yaml")
    return config.runs["r"], config.notes["r"]


def test_a_qlora_config_as_written(work):
    run, notes = run_of("llama3-qlora.yml")
    assert run.adapter == "qlora" and (run.lora_r, run.lora_alpha, run.lora_dropout) == (32, 16.0, 0.05)
    assert run.datasets[0].path == "hf:teknium/GPT4-LLM-Cleaned:default@train"  # bare hub id, subset, split
    assert run.optimizer == "adamw_bnb_8bit"  # Axolotl's alias adamw_8bit
    assert run.learning_rate == 2e-4 and run.warmup_ratio == 0.1
    assert (run.evals_per_epoch, run.saves_per_epoch) == (4, 1)
    assert run.output_dir == "outputs/qlora-out" and run.gradient_checkpointing
    assert run.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    noted = {re.match(r"c\.yaml: runs\.r\.(\w+)", n).group(1) for n in notes if n.startswith("c.yaml: runs.r.")}
    assert {"model_type", "tokenizer_type", "flash_attention", "eval_sample_packing", "gradient_checkpointing_kwargs",
            "loss_watchdog_threshold", "lora_target_linear"} <= noted
    assert run.special_tokens.pad_token == "<|end_of_text|>"  # a tunedag key of the same name and meaning
    assert any("unset (null)" in n and "wandb_watch" in n and "lora_model_dir" in n for n in notes)


def test_an_8bit_lora_config_with_its_meaning_kept_or_noted(work):
    run, notes = run_of("mistral-lora.yml")
    assert run.adapter == "lora" and run.datasets[0].path == "data/alpaca.jsonl"
    assert run.val_set_size == 0.05 and any("val_set_size = 0" in n for n in notes)
    assert any("load_in_8bit" in n and "no 8-bit base" in n for n in notes)
    assert run.warmup_steps == 10 and run.eval_max_new_tokens == 128 and run.train_engine == "auto"


def test_an_axolotl_config_without_adapter_is_a_full_fine_tune_never_lora(work):
    run, notes = run_of("qwen3-full.yaml")
    assert run.adapter is None
    assert any("full fine-tune" in n for n in notes)
    assert run.learning_rate == 2e-5 and run.optimizer == "adamw_torch_fused"


def test_inline_keys_read_as_the_file_and_override_it(work):
    inline, _ = run_of("mistral-lora.yml", lora_r=8, micro_batch_size=4)
    assert (inline.lora_r, inline.micro_batch_size) == (8, 4)
    raw = {"base_model": "builtin:tiny-llama", "datasets": [{"path": "data/alpaca.jsonl", "type": "alpaca"}],
           "load_in_4bit": True, "adapter": "lora", "bf16": "auto", "saves_per_epoch": 2}
    run = parse_config({"runs": {"r": raw}}).runs["r"]
    assert run.adapter == "qlora" and run.saves_per_epoch == 2


def test_every_problem_is_reported_at_once_each_naming_key_value_and_fix(work):
    raw = {"base_model": "builtin:tiny-llama", "datasets": [{"path": "data/missing.jsonl", "type": "alpaca"}],
           "adapter": "lora", "fp16": True, "peft_use_dora": True, "lora_model_dir": "old-adapter",
           "neftune_noise_alpha": 5, "lora_r": "sixteen", "learnig_rate": 1e-4, "num_epochs": 0,
           "added_tokens_overrides": {128002: "<x>"}, "fsdp_config": {"offload_params": True}}
    with pytest.raises(ConfigError) as err:
        parse_config({"runs": {"r": raw}}, source="c.yaml")
    problems = err.value.problems
    expected = {"fp16": "bf16", "peft_use_dora": "plain LoRA", "lora_model_dir": "merge it",
                "neftune_noise_alpha": "not offered", "added_tokens_overrides": "not offered", "fsdp_config": "deepspeed_offload"}
    for key, fix in expected.items():
        assert any(p.startswith(f"c.yaml: runs.r.{key}:") and fix in p for p in problems), (key, problems)
    # refusals, unknown keys, type errors and value checks together: the config is fixed in one pass
    others = [p.split(": ")[1] for p in problems if not any(p.startswith(f"c.yaml: runs.r.{k}:") for k in expected)]
    assert others == ["runs.r", "runs.r.lora_r", "runs.r.datasets[0].path", "runs.r.num_epochs"], problems
    assert "did you mean 'learning_rate'" in problems[len(expected)]


def test_a_key_that_asks_for_nothing_is_never_refused(work):
    run, _ = run_of("mistral-lora.yml", fp16=False, peft_use_dora=None, relora=False, test_datasets=[])
    assert run.adapter == "lora"


def test_every_axolotl_key_has_one_fate_and_tunedag_keys_keep_their_meaning():
    tunedag_keys = {f.name for f in dataclasses.fields(RunConfig)}
    assert not (set(IGNORED_KEYS) & tunedag_keys) and not (set(REFUSED_KEYS) & tunedag_keys)
    assert not (set(TRANSLATED) & set(IGNORED_KEYS)) and not (set(TRANSLATED) & set(REFUSED_KEYS))
    assert AXOLOTL_ONLY == (set(TRANSLATED) | set(IGNORED_KEYS) | set(REFUSED_KEYS)) - tunedag_keys


def test_readme_lists_every_axolotl_key_with_its_fate():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Coming from Axolotl", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z0-9_]+)`", section))
    missing = (set(TRANSLATED) | set(IGNORED_KEYS) | set(REFUSED_KEYS) | set(DATASET_TRANSLATED)
               | set(DATASET_REFUSED_KEYS)) - listed
    assert not missing, f"README's Coming from Axolotl lacks {sorted(missing)}"


def test_the_effective_config_reads_back_to_the_same_runs(work):
    Path("c.yaml").write_text("runs:\n  q: {axolotl: axolotl/llama3-qlora.yml}\n  m: {axolotl: axolotl/mistral-lora.yml}\n")
    config = load_config("c.yaml")
    text = effective_config(config)
    assert "# c.yaml: runs.q.model_type = 'AutoModelForCausalLM': no effect in tunedag" in text
    Path("effective.yaml").write_text(text)
    again = load_config("effective.yaml")
    assert again.runs == config.runs and again.notes == {}


def test_two_runs_writing_one_folder_are_refused_naming_both(work):
    with pytest.raises(ConfigError, match=r"runs\.a and runs\.b both write to 'outputs/lora-out'"):
        parse_config({"runs": {"a": {"axolotl": "axolotl/mistral-lora.yml"},
                               "b": {"axolotl": "axolotl/mistral-lora.yml", "lora_r": 8}}})


@pytest.mark.parametrize("ratio, steps, expected", [(None, 100, 7), (0.1, 95, 9), (0.0, 10, 0)])
def test_warmup_ratio_is_a_share_of_all_steps(ratio, steps, expected):
    run = dataclasses.replace(RunConfig(base_model="b", datasets=[]), warmup_steps=0 if ratio is not None else 7,
                              warmup_ratio=ratio)
    assert warmup_steps(run, steps) == expected


def test_saves_per_epoch_spaces_checkpoints_over_an_epoch():
    run = dataclasses.replace(RunConfig(base_model="b", datasets=[]), micro_batch_size=2, saves_per_epoch=3)
    assert save_interval(run, rows=40) == 6  # 20 steps an epoch
    assert save_interval(dataclasses.replace(run, saves_per_epoch=None), rows=40) == run.save_steps


def test_configfile_replaces_the_default_config_and_notes_are_logged(work):
    Path("config.yaml").write_text("runs:\n  demo: {base_model: builtin:tiny-llama, datasets: "
                                   "[{path: data/alpaca.jsonl, type: alpaca}]}\n")
    Path("mine.yaml").write_text("runs:\n  mine: {axolotl: axolotl/mistral-lora.yml, base_model: builtin:tiny-llama,"
                                 " sequence_len: 256}\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
                             "mine.yaml", "-n", "--cores", "1", "--quiet", "rules"],
                            capture_output=True, text=True, timeout=180, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mine.yaml: runs.mine.load_in_8bit = True: tunedag has no 8-bit base" in result.stderr
    again = subprocess.run(result.args, capture_output=True, text=True, timeout=180, cwd=work)
    assert "runs.mine.load_in_8bit = True" in again.stderr  # every time the user starts Snakemake
    (effective,) = Path(".snakemake/tunedag").glob("config-*.yaml")
    assert list(load_config(effective).runs) == ["mine"]
    assert load_config(effective).runs["mine"].output_dir == "outputs/lora-out"


def test_every_key_of_axolotls_schema_has_a_fate():
    lines = (EXAMPLES / "schema_keys.txt").read_text().splitlines()
    keys = [line for line in lines if line and not line.startswith("#")]
    run_keys = {k for k in keys if not k.startswith("datasets.")}
    dataset_keys = {k.removeprefix("datasets.") for k in keys} - run_keys
    assert len(run_keys) > 350 and len(dataset_keys) > 40
    assert not run_keys - {f.name for f in dataclasses.fields(RunConfig)} - AXOLOTL_ONLY
    tunedag_dataset_keys = {f.name for f in dataclasses.fields(DatasetConfig)}
    assert not dataset_keys - tunedag_dataset_keys - set(DATASET_TRANSLATED) - set(DATASET_REFUSED_KEYS)
    assert not (tunedag_dataset_keys & set(DATASET_REFUSED_KEYS))


def test_axolotl_dataset_entries_translate_or_are_refused_by_key(work):
    Path("axolotl/template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    kto = {"path": "argilla/kto-mix-15k", "type": "llama3.intel", "split": "train"}
    chat = {"path": "data/alpaca.jsonl", "type": "chat_template", "chat_template": "jinja",
            "chat_template_jinja": "axolotl/template.jinja", "train_on_eot": "all"}
    run, _ = run_of("mistral-lora.yml", rl="kto", datasets=[kto])
    ds = run.datasets[0]
    assert (ds.path, ds.type, ds.field_prompt, ds.field_completion, ds.field_label, ds.chat_template) == (
        "hf:argilla/kto-mix-15k@train", "kto", "question", "completion", "label", "llama3")
    run, _ = run_of("mistral-lora.yml", datasets=[chat])
    assert run.datasets[0].chat_template_jinja.startswith("{% for m in messages %}")
    assert run.datasets[0].train_on_eos == "all"
    with pytest.raises(ConfigError) as err:
        run_of("mistral-lora.yml", datasets=[{**chat, "message_field_training": "train", "data_files": ["a.json"],
                                              "train_on_eos": "turn"}])
    assert [p.split(": ")[1] for p in err.value.problems] == [
        "runs.r.datasets[0].message_field_training", "runs.r.datasets[0].data_files", "runs.r.datasets[0].train_on_eot"]


def test_a_bare_hub_id_in_a_tunedag_run_gets_the_hf_hint(work):
    raw = {"base_model": "builtin:tiny-llama", "datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}]}
    with pytest.raises(ConfigError, match=r"file not found: 'tatsu-lab/alpaca' \(a hub dataset\? write "
                                          r"hf:tatsu-lab/alpaca\)"):
        parse_config({"runs": {"r": raw}})


def test_adam_betas_and_epsilon_reach_the_optimizer(work):
    import torch

    from tunedag.train.engines import make_optimizer

    run, _ = run_of("mistral-lora.yml", adam_beta2=0.95, adam_epsilon="1e-5", optimizer="adamw_torch")
    group = make_optimizer([torch.nn.Parameter(torch.zeros(2))], run).param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.95), 1e-5)
    with pytest.raises(ConfigError, match="adam_beta2: must be in"):
        run_of("mistral-lora.yml", adam_beta2=1.0)


def test_a_secret_in_an_axolotl_config_never_reaches_a_note_or_the_effective_config(work):
    config = parse_config({"runs": {"r": {"axolotl": "axolotl/mistral-lora.yml", "comet_api_key": "s3cr3t-key",
                                          "hf_use_auth_token": "hf_abcdef"}}}, source="c.yaml")
    assert any("comet_api_key = '***'" in n for n in config.notes["r"])
    assert "s3cr3t" not in effective_config(config) and "hf_abc" not in effective_config(config)


def test_a_key_outside_both_schemas_in_an_axolotl_file_is_ignored_with_a_note(work):
    """Axolotl ignores keys its schema lacks, so a file run as written does too; tunedag's own config stays strict."""
    Path("axolotl/extra.yml").write_text(Path("axolotl/llama3-qlora.yml").read_text() + "test_value: true\n")
    _, notes = run_of("extra.yml")
    assert any("test_value = True: not a key of Axolotl's schema or tunedag's; ignored" in n for n in notes)
    with pytest.raises(ConfigError, match="unknown key 'test_value'"):
        run_of("llama3-qlora.yml", test_value=True)


def test_gpt_oss_configs_load_mxfp4_dequantized_and_map_the_thinking_field():
    """Axolotl's gpt-oss examples: Mxfp4Config(dequantize=True) is what tunedag does with an MXFP4 checkpoint;
    field_thinking/template_thinking_key become a message property mapping; constant_with_warmup is constant."""
    keys = {"base_model": "builtin:tiny-llama", "adapter": "lora", "lr_scheduler": "constant_with_warmup",
            "model_quantization_config": "Mxfp4Config", "model_quantization_config_kwargs": {"dequantize": True},
            "datasets": [{"path": "hf:org/multilingual-thinking", "type": "chat_template",
                          "field_thinking": "reasoning", "template_thinking_key": "thinking"}]}
    config = parse_config({"runs": {"r": keys}}, source="c.yaml")
    run = config.runs["r"]
    assert run.lr_scheduler == "constant"
    assert run.datasets[0].message_property_mappings == {"thinking": "reasoning"}
    assert any("MXFP4 checkpoint's experts (gpt-oss) dequantized" in n for n in config.notes["r"])
    with pytest.raises(ConfigError, match=r"model_quantization_config: 'Mxfp4Config': .*dequantize: true"):
        parse_config({"runs": {"r": {**keys, "model_quantization_config_kwargs": None}}}, source="c.yaml")
