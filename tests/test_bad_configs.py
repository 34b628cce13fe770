"""A battery of bad config.yaml files: each is refused before any job starts, in one line.

Every case is YAML text and a fragment of the message it must give. In-process cases go through
``load_config`` (the duplicate-key YAML loader and ``parse_config``, what workflow/rules/common.smk
calls); a handful also go through ``snakemake -n`` to check what a user sees: a non-zero exit, one
stderr line starting "tunedag: config error:", no traceback, nothing written.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunedag.config import ConfigError, load_config, time_minutes

REPO = Path(__file__).resolve().parents[1]


def run(extra: str = "", name: str = "demo", datasets: str = "[{path: data.jsonl, type: alpaca}]",
        base_model: str = "builtin:tiny-llama", cluster: str = "") -> str:
    """config.yaml text: one run ``name`` with ``extra`` lines, and ``cluster`` lines under cluster:."""
    text = f"runs:\n  {name}:\n    base_model: {base_model}\n    datasets: {datasets}\n"
    if extra:
        text += textwrap.indent(textwrap.dedent(extra).strip("\n"), "    ") + "\n"
    if cluster:
        text += "cluster:\n" + textwrap.indent(textwrap.dedent(cluster).strip("\n"), "  ") + "\n"
    return text


def two_runs(a: str, b: str, b_data: str = "data.jsonl") -> str:
    return run(a, name="a") + run(b, name="b", datasets=f"[{{path: {b_data}}}]").removeprefix("runs:\n")



CASES = [
    # names that become paths (item 2) and reach a shell (item 3)
    ("run-name-dotdot", run(name='".."'), "the run name '..' is not a plain name"),
    ("run-name-dot", run(name='"."'), "the run name '.' is not a plain name"),
    ("run-name-injection", run(name='"x$(touch PWNED)"'), "the run name 'x$(touch PWNED)' is not a plain name"),
    ("run-name-space", run(name='"my run"'), "the run name 'my run' is not a plain name"),
    ("run-name-dash", run(name='"-rf"'), "the run name '-rf' is not a plain name"),
    ("dataset-name-escapes", run(datasets='[{path: data.jsonl, name: "../../x"}]'),
     "runs.demo.datasets[0].name: name: '../../x' is not a plain name"),
    ("dataset-name-injection", run(datasets='[{path: data.jsonl, name: "x$(touch PWNED)"}]'),
     "runs.demo.datasets[0].name: name: 'x$(touch PWNED)' is not a plain name"),
    ("dataset-name-dot", run(datasets='[{path: data.jsonl, name: "."}]'), "datasets[0].name: name: '.' is not"),
    ("dataset-name-from-hidden-file", run(datasets="[{path: .hidden.jsonl}]"),
     "datasets[0].path: the name '.hidden' taken from the path is not a plain name"),
    ("output-dir-space", run('output_dir: "runs/my run"'), "runs.demo.output_dir: 'runs/my run' is not a folder inside"),
    ("output-dir-absolute", run("output_dir: /tmp/elsewhere"), "output_dir: '/tmp/elsewhere' is not a folder inside"),
    ("output-dir-parent", run("output_dir: ../outside"), "output_dir: '../outside' is not a folder inside"),
    ("output-dir-trailing-slash", run("output_dir: runs/x/"), "output_dir: 'runs/x/' is not a folder inside"),
    ("output-dir-injection", run('output_dir: "runs/$(touch PWNED)"'), "is not a folder inside the work folder"),
    ("output-dir-in-data", run("output_dir: data/mine"), "output_dir: 'data/mine' lies in data/"),
    ("output-dir-shared", two_runs("output_dir: runs/same", "output_dir: runs/same"),
     "runs.a and runs.b both write to 'runs/same'"),
    ("output-dir-nested", two_runs("output_dir: runs/b/inner", "seed: 1"),
     "runs.a writes to 'runs/b/inner' and runs.b to 'runs/b': one run folder lies inside the other"),
    ("dataset-name-two-sources",
     two_runs("seed: 1", "seed: 2", b_data="other/data.jsonl"),
     "runs.a and runs.b use the dataset name 'data' for two different sources"),
    ("base-model-injection", run(base_model='"org/$(touch PWNED)"'),
     "base_model: 'org/$(touch PWNED)' is not builtin:<name>, an existing local folder, or a hub id"),
    ("base-model-deep-path", run(base_model="a/b/c"), "base_model: 'a/b/c' is not builtin:<name>"),
    ("base-model-missing-folder", run(base_model="./nope"), "runs.demo.base_model: folder not found: './nope'"),
    ("base-model-unknown-builtin", run(base_model="builtin:huge"), "unknown built-in model 'builtin:huge'"),
    # late failures (item 5)
    ("sequence-len-past-positions", run("sequence_len: 1000000000"),
     "runs.demo.sequence_len: 1000000000 is longer than the model's max_position_embeddings 2048"),
    ("sequence-len-1e9", run("sequence_len: 1e9"), "runs.demo.sequence_len: expected an integer, got '1e9'"),
    ("sequence-len-local-model", run("sequence_len: 1024", base_model="local-llama"),
     "longer than the model's max_position_embeddings 512 (local-llama/config.json)"),
    ("learning-rate-negative", run("learning_rate: -1.0e-4"), "runs.demo.learning_rate: must be positive, got -0.0001"),
    ("learning-rate-zero", run("learning_rate: 0"), "runs.demo.learning_rate: must be positive, got 0.0"),
    ("learning-rate-nan", run("learning_rate: .nan"), "runs.demo.learning_rate: expected a finite number, got nan"),
    ("lora-dropout-2", run("lora_dropout: 2"), "runs.demo.lora_dropout: must be in [0, 1), got 2.0"),
    ("lora-dropout-negative", run("lora_dropout: -0.1"), "runs.demo.lora_dropout: must be in [0, 1), got -0.1"),
    ("target-module-missing", run("lora_target_modules: [q_proj, c_attn]"),
     "runs.demo.lora_target_modules: a llama model has no module named 'c_attn' (builtin:tiny-llama)"),
    ("target-module-local-model", run("lora_target_modules: [qkv]", base_model="local-llama"),
     "a llama model has no module named 'qkv' (local-llama/config.json)"),
    ("target-module-not-served", run("lora_target_modules: [c_attn]", base_model="local-gpt2"),
     "runs.demo.lora_target_modules: vLLM's LoRA layers do not cover 'c_attn'"),
    ("target-modules-empty", run("lora_target_modules: []"), "lora_target_modules: at least one module is needed"),
    ("temperature-negative", run("eval_temperature: -0.5"), "runs.demo.eval_temperature: must be at least 0, got -0.5"),
    ("top-p-zero", run("eval_top_p: 0"), "runs.demo.eval_top_p: must be in (0, 1], got 0.0"),
    ("top-p-above-1", run("eval_top_p: 1.5"), "runs.demo.eval_top_p: must be in (0, 1], got 1.5"),
    ("warmup-negative", run("warmup_steps: -5"), "runs.demo.warmup_steps: must be at least 0, got -5"),
    ("skip-layers-negative", run("gradient_checkpointing_skip_layers: -1"),
     "runs.demo.gradient_checkpointing_skip_layers: must be at least 0, got -1"),
    ("max-steps-zero", run("max_steps: 0"), "runs.demo.max_steps: must be at least 1, got 0"),
    ("lora-r-not-served", run("lora_r: 4"), "runs.demo.lora_r: vLLM serves LoRA ranks 1, 8, 16, 32, 64, 128, 256, "
                                            "320, 512 only, got 4"),
    ("lora-r-zero", run("lora_r: 0"), "runs.demo.lora_r: must be at least 1, got 0"),
    ("lora-alpha-zero", run("lora_alpha: 0"), "runs.demo.lora_alpha: must be positive, got 0.0"),
    ("weight-decay-negative", run("weight_decay: -0.1"), "runs.demo.weight_decay: must be at least 0"),
    ("grad-norm-negative", run("max_grad_norm: -1"), "runs.demo.max_grad_norm: must be at least 0"),
    ("eval-samples-zero", run("eval_max_samples: 0"), "runs.demo.eval_max_samples: must be at least 1"),
    ("eval-tokens-zero", run("eval_max_new_tokens: 0"), "runs.demo.eval_max_new_tokens: must be at least 1"),
    ("epochs-zero", run("num_epochs: 0"), "runs.demo.num_epochs: must be at least 1"),
    ("val-set-fractional-count", run("val_set_size: 1.5"), "runs.demo.val_set_size: a share is below 1"),
    ("val-set-zero", run("val_set_size: 0"), "runs.demo.val_set_size: must be positive"),
    ("shard-size-words", run("max_shard_size: lots"), "runs.demo.max_shard_size: 'lots' is not a size"),
    ("kto-weight-negative", run("kto_desirable_weight: -1"), "runs.demo.kto_desirable_weight: must be at least 0"),
    ("orpo-alpha-negative", run("orpo_alpha: -1"), "runs.demo.orpo_alpha: must be at least 0"),
    ("unknown-key", run("lora_rank: 8"), "runs.demo: unknown key 'lora_rank' (did you mean 'lora_r'?)"),
    ("wrong-type", run("learning_rate: fast"), "runs.demo.learning_rate: expected a number, got 'fast'"),
    # duplicate YAML keys: YAML would keep the last one silently
    ("duplicate-run-key", run("lora_r: 8\nlora_r: 32"), "config.yaml:6: duplicate key 'lora_r' (line 5 sets it too"),
    ("duplicate-run-name", run() + "  demo:\n    base_model: builtin:tiny-llama\n",
     "config.yaml:5: duplicate key 'demo' (line 2 sets it too"),
    ("duplicate-top-key", run() + "runs: {}\n", "config.yaml:5: duplicate key 'runs' (line 1 sets it too"),
    ("not-yaml", "runs: [\n", "config.yaml: not valid YAML"),
    # cluster resources
    ("time-1h", run(cluster="train: {time: 1h}"),
     "cluster.train.time: '1h' is not HH:MM:SS, MM:SS or D-HH:MM:SS (sbatch --time)"),
    ("time-minutes-only", run(cluster="train: {time: '90'}"), "cluster.train.time: '90' is not HH:MM:SS"),
    ("time-61-minutes", run(cluster="train: {time: '01:61:00'}"), "cluster.train.time: '01:61:00' is not HH:MM:SS"),
    ("time-25-hours-in-a-day", run(cluster="train: {time: '1-25:00:00'}"), "cluster.train.time: '1-25:00:00' is not"),
    ("time-zero", run(cluster="train: {time: '00:00:00'}"), "cluster.train.time: '00:00:00' is no time at all"),
    ("gpus-negative", run(cluster="train: {gpus_per_node: -1}"), "cluster.train.gpus_per_node: must be at least 0"),
    ("nodes-zero", run(cluster="train: {nodes: 0}"), "cluster.train.nodes: must be at least 1"),
    ("tasks-zero", run(cluster="train: {tasks_per_node: 0}"), "cluster.train.tasks_per_node: must be at least 1"),
    ("mem-zero", run(cluster="evaluate: {mem_gb: 0}"), "cluster.evaluate.mem_gb: must be positive"),
    ("partition-injection", run(cluster="train: {partition: 'gpu; rm -rf ~'}"),
     "cluster.train.partition: 'gpu; rm -rf ~' is not a Slurm name"),
    ("constraint-space", run(cluster="train: {constraint: 'a100 80gb'}"),
     "cluster.train.constraint: 'a100 80gb' is not a Slurm constraint"),
    ("sbatch-arg-short", run(cluster="train: {sbatch_args: [exclusive]}"),
     "cluster.train.sbatch_args: 'exclusive' is not a long sbatch option"),
    ("cluster-unknown-stage", run(cluster="trian: {nodes: 1}"), "cluster: unknown stage 'trian' (did you mean 'train'?)"),
    # data files the config check can see
    ("dataset-missing", run(datasets="[{path: missing.jsonl}]"), "datasets[0].path: file not found: 'missing.jsonl'"),
    ("dataset-is-folder", run(datasets="[{path: other}]"), "datasets[0].path: is a folder, not a file: 'other'"),
    ("dataset-weight-zero", run(datasets="[{path: data.jsonl, weight: 0}]"), "datasets[0].weight: must be positive"),
    ("url-without-sha", run(datasets="[{path: 'https://example.org/d.jsonl'}]"), "datasets[0].sha256: required"),
]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A work folder with a data file, a hidden-named one, two local model folders."""
    monkeypatch.chdir(tmp_path)
    row = '{"instruction": "a", "output": "b"}\n'
    for name in ("data.jsonl", ".hidden.jsonl", "other/data.jsonl"):
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text(row)
    for folder, cfg in {"local-llama": {"model_type": "llama", "max_position_embeddings": 512},
                        "local-gpt2": {"model_type": "gpt2", "n_positions": 1024}}.items():
        Path(folder).mkdir()
        (Path(folder) / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_battery_is_large_and_its_names_unique():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("text, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_in_one_line_per_problem_naming_file_and_key(work, text, fragment):
    Path("config.yaml").write_text(text)
    before = listing(work)
    with pytest.raises(ConfigError) as err:
        load_config("config.yaml")
    assert any(fragment in p for p in err.value.problems)
    assert all(p.startswith("config.yaml") and "\n" not in p for p in err.value.problems)
    assert listing(work) == before


def test_a_good_config_passes(work):
    Path("config.yaml").write_text(run("output_dir: runs/my-run.v2\nlora_r: 8", base_model="local-llama",
                                       cluster="train: {time: '1-00:00:00'}\nmerge: {time: '30:00'}"))
    config = load_config("config.yaml")
    assert config.run_dir("demo") == "runs/my-run.v2"
    assert [time_minutes(t) for t in ("1-00:00:00", "30:00", "04:00:30", "100:00:00")] == [1440, 30, 241, 6000]


def snakemake_dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", *args]  # config.yaml of workdir, as a user runs it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=workdir)


SNAKEMAKE_CASES = ["run-name-dotdot", "dataset-name-injection", "duplicate-run-key", "time-1h", "lora-r-not-served"]


@pytest.mark.parametrize("case", SNAKEMAKE_CASES)
def test_snakemake_refuses_before_any_job_with_one_line(work, case):
    (_, text, fragment), = [c for c in CASES if c[0] == case]
    Path("config.yaml").write_text(text)
    before = listing(work) - {".snakemake"}
    proc = snakemake_dry_run(work, "--until", "download")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunedag: config error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    written = {p for p in listing(work) - before if not p.startswith(".snakemake")}
    assert written == set() and not Path("PWNED").exists()


def planned(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "" if "Nothing to be done" in proc.stdout + proc.stderr else proc.stdout


def test_an_edited_local_source_is_downloaded_again(work):
    """download's input is the local source file: editing it reruns download (a stale copy is not kept)."""
    Path("config.yaml").write_text(run(datasets="[{path: data.jsonl, name: rows}]"))
    done = snakemake_dry_run(work, "--until", "download")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(Path("data/raw/rows/source.json").read_text())["rows"] == 1
    assert "rule download" not in planned(snakemake_dry_run(work, "-n", "--until", "download"))
    Path("data.jsonl").write_text('{"instruction": "c", "output": "d"}\n' * 2)
    assert "rule download" in planned(snakemake_dry_run(work, "-n", "--until", "download"))
