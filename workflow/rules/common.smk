# Config validation and the path helpers every rule uses.
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from tunedag.config import ConfigError, effective_config, hash_json, load_yaml, parse_config, time_minutes
from tunedag.io import atomic_path

# The library's typed check names the key and value at fault; the JSON schema is the same
# contract in Snakemake's own terms (workflow/schemas is generated from tunedag.config), checked
# on the effective config below (Axolotl keys translated).
# Snakemake has loaded the config files already, keeping the last of a key written twice: each is
# read again with a loader that refuses duplicate keys, naming file and line.
_CONFIG_FILES = list({Path(p).resolve(): p for p in workflow.configfiles}.values())  # each file once
try:
    for _path in _CONFIG_FILES:
        load_yaml(_path)
    CFG = parse_config(config, source=",".join(map(str, _CONFIG_FILES)) or "config")
except ConfigError as err:
    sys.exit(f"tunedag: config error: {err}")

# imported after the check: a bad config is refused before torch loads
from tunedag.data.tokenize import code_hash
from tunedag.models.loading import model_dir

# -P: the scripts folder stays off sys.path, so scripts/tokenize.py cannot shadow the stdlib module.
# With --use-conda every rule runs in envs/tunedag.yaml's environment and finds tunedag through
# PYTHONPATH; otherwise in the interpreter that runs Snakemake (the .venv of `make run`).
CONDA_ENV = "../../envs/tunedag.yaml"
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PYTHON = f"PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}} python -P"
else:
    PYTHON = f"{shlex.quote(sys.executable)} -P"
SCRIPTS = Path(workflow.basedir) / "scripts"
# Scripts read the config as tunedag runs it (--configfile and --config included, defaults merged,
# Axolotl keys translated): every key with its value, and the notes on Axolotl keys without effect.
_EFFECTIVE = effective_config(CFG)
EFFECTIVE_CONFIG = Path(".snakemake/tunedag") / f"config-{hash_json(_EFFECTIVE)[:16]}.yaml"
validate(yaml.safe_load(_EFFECTIVE), "../schemas/config.schema.json")
if not EFFECTIVE_CONFIG.exists():
    EFFECTIVE_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(EFFECTIVE_CONFIG) as _tmp:
        Path(_tmp).write_text(_EFFECTIVE)
if CFG.notes and not (workflow.remote_exec or workflow.subprocess_exec):  # the user's run, not each job's
    for _note in (note for notes in CFG.notes.values() for note in notes):
        print(f"tunedag: note: {_note}", file=sys.stderr)
    print(f"tunedag: the effective config, with these notes: {EFFECTIVE_CONFIG}", file=sys.stderr)

# parse_config has checked that run folders differ and that a dataset name means one source.
# Every value below reaches a shell command through {x:q} (shlex-quoted) in the rules.
RUN_OF_DIR = {CFG.run_dir(name): name for name in CFG.runs}
DATASETS = {ds.dataset_name: (name, ds) for name, run in CFG.runs.items() for ds in run.datasets}


def _alternation(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    run=_alternation(CFG.runs),
    run_dir=_alternation(RUN_OF_DIR),
    dataset=_alternation(DATASETS),


def run_of(wildcards):
    """The run name behind a rule's wildcards ({run} or {run_dir})."""
    return wildcards.run if hasattr(wildcards, "run") else RUN_OF_DIR[wildcards.run_dir]


def run_config(wildcards):
    return CFG.runs[run_of(wildcards)]


def local_source(wildcards):
    """download's input: a local source file, so that an edited file is downloaded again (hub and
    https sources are not files here; the source param's hash stands for them)."""
    path = DATASETS[wildcards.dataset][1].path
    return [] if path.startswith(("hf:", "https://", "http://")) else [path]


def base_model_dir(wildcards):
    run = run_config(wildcards)
    return str(model_dir(run.base_model, run.base_model_revision))


def stage_hash(stage):
    """A rule param: Snakemake reruns the rule when its config slice changes."""
    return lambda wildcards: CFG.runs[run_of(wildcards)].stage_hash(stage)


def gguf_runs():
    """Runs that get GGUF files: not reward models (llama.cpp runs generators; a reward model scores)."""
    return [name for name, run in CFG.runs.items() if not run.trains_classifier]


def vllm_runs():
    """Runs that get a vLLM folder: not process reward models (tunedag.export.vllm says why)."""
    return [name for name, run in CFG.runs.items() if run.rl != "prm"]


def gguf_metrics(name):
    """The export stage's size-and-perplexity JSON of each GGUF file of run ``name`` (the report shows them)."""
    if name not in gguf_runs():
        return []
    return [f"{CFG.run_dir(name)}/export/{name}-{t}.json" for t in CFG.runs[name].gguf_types]


def all_targets():
    targets = []
    for name, run in CFG.runs.items():
        run_dir = CFG.run_dir(name)
        targets += [f"{run_dir}/eval", f"{run_dir}/report/summary.html"]
        if name in vllm_runs():
            targets.append(f"{run_dir}/export/vllm")
        if name in gguf_runs():
            targets += [f"{run_dir}/export/{name}-{t}.gguf" for t in run.gguf_types]
    return targets + ["reports/runs_compared.html"]


def stage_resources(stage):
    """Slurm resources of ``stage`` from config.yaml's cluster section (the profile fills the rest)."""
    res = CFG.cluster.get(stage)
    if res is None:
        return {}
    out = {"runtime": time_minutes(res.time), "mem_mb": int(res.mem_gb * 1024),
           "cpus_per_task": res.cpus_per_task, "nodes": res.nodes}
    if res.gpus_per_node:
        out["gpu"] = res.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            out[f"slurm_{key}"] = getattr(res, key)
    if res.constraint:
        out["constraint"] = res.constraint
    if res.sbatch_args:
        out["slurm_extra"] = " ".join(shlex.quote(a) for a in res.sbatch_args)
    # GPU rules: no "tasks" resource, else plugin 2.8 turns it into --ntasks-per-gpu
    return out
