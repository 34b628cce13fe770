"""The run configuration: typed, validated before any job starts, hashed per stage.

config.yaml holds ``defaults`` (shared by every run), ``runs`` (one entry per run; a sweep is
several runs) and ``cluster`` (Slurm resources per stage). Key names follow Axolotl's wherever
the meaning is the same. Each field records which stages read it, so that a stage's outputs
carry the hash of exactly the keys that made them and a changed key reruns only the stages
that read it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from tunedag.builtin_models import BUILTIN_MODELS
from tunedag.deepspeed_json import DeepSpeedConfigError, check_user_config, owned_values, read_user_config
from tunedag.errors import TunedagError

STAGES = ("download", "tokenize", "train", "merge", "evaluate", "export_gguf", "export_vllm")


class ConfigError(TunedagError, ValueError):
    """A config.yaml problem, with the key path and value that cause it."""


def _field(default: Any = dataclasses.MISSING, *, stages: tuple[str, ...], doc: str,
           factory: Any = dataclasses.MISSING) -> Any:
    meta = {"stages": stages, "doc": doc}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of ``datasets``: where the rows come from and how they are formatted."""

    path: str = _field(stages=("download", "tokenize"),
                       doc="local file (jsonl/json/csv/parquet), https:// URL, or hf:org/name[:config][@split]")
    type: Literal["alpaca", "sharegpt", "chat_template", "completion", "input_output", "dpo", "kto"] = _field(
        "alpaca", stages=("tokenize",), doc="row format (see tunedag/data/formats.py)")
    name: Optional[str] = _field(None, stages=("download", "tokenize"),
                                 doc="name of data/raw/{name}/ (default: derived from path)")
    sha256: Optional[str] = _field(None, stages=("download",), doc="required for https:// sources")
    weight: float = _field(1.0, stages=("tokenize",),
                           doc="sampling weight of the training rows: each is used floor(w) times, a seeded "
                               "share frac(w) once more")
    roles_to_train: list[str] = _field(stages=("tokenize",), doc="chat roles whose turns are trained",
                                       factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "none", "last"] = _field(
        "turn", stages=("tokenize",), doc="end-of-turn tokens trained: of trained turns, all, none, or the last")
    field: Optional[str] = _field(None, stages=("tokenize",), doc="text field (completion; segments for input_output)")
    field_instruction: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca instruction field")
    field_input: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca input field")
    field_output: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca output field")
    field_system: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca/dpo system field")
    field_messages: Optional[str] = _field(None, stages=("tokenize",), doc="sharegpt/chat_template/kto messages field")
    message_field_role: Optional[str] = _field(None, stages=("tokenize",), doc="role key inside a message")
    message_field_content: Optional[str] = _field(None, stages=("tokenize",), doc="content key inside a message")
    field_prompt: Optional[str] = _field(None, stages=("tokenize",), doc="dpo prompt field")
    field_chosen: Optional[str] = _field(None, stages=("tokenize",), doc="dpo chosen field")
    field_rejected: Optional[str] = _field(None, stages=("tokenize",), doc="dpo rejected field")
    field_label: Optional[str] = _field(None, stages=("tokenize",), doc="kto label field (true = desirable)")

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        source = self.path.removeprefix("hf:").split("@")[0]
        stem = Path(source.replace(":", "-")).name
        stem = re.sub(r"\.(jsonl|json|csv|parquet)(\.gz)?$", "", stem)
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, after ``defaults`` are merged in."""

    base_model: str = _field(stages=("tokenize", "train", "merge", "evaluate"),
                             doc="builtin:tiny-llama, a hub id, or a local HF folder")
    datasets: list[DatasetConfig] = _field(stages=("tokenize",), doc="training data sources")
    trust_remote_code: bool = _field(False, stages=("tokenize", "train", "merge", "evaluate"),
                                     doc="allow model code from the hub (off unless turned on)")
    sequence_len: int = _field(512, stages=("tokenize",), doc="tokens per packed row")
    sample_packing: bool = _field(True, stages=("tokenize",), doc="pack samples into full rows")
    val_set_size: float = _field(0.05, stages=("tokenize",),
                                 doc="held-out share of rows (<1) or number of rows (>=1)")
    train_on_inputs: bool = _field(False, stages=("tokenize",), doc="also train on prompt tokens")
    chat_template: Literal["tokenizer_default", "llama3", "chatml", "mistral", "gemma", "qwen"] = _field(
        "tokenizer_default", stages=("tokenize",), doc="template for chat and preference formats")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = _field(
        "drop", stages=("tokenize",), doc="samples longer than sequence_len: drop, truncate or raise")
    on_bad_rows: Literal["raise", "skip"] = _field("raise", stages=("tokenize",),
                                                   doc="a malformed row stops the stage, or is skipped and counted")
    adapter: Optional[Literal["lora", "qlora"]] = _field(
        "lora", stages=("train", "merge"),
        doc="lora, or qlora (LoRA over a 4-bit NF4 base); full fine-tuning (null) is not supported yet")
    lora_r: int = _field(16, stages=("train",), doc="LoRA rank")
    lora_alpha: float = _field(32, stages=("train",), doc="LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = _field(0.0, stages=("train",), doc="dropout on the LoRA input")
    lora_target_modules: list[str] = _field(
        stages=("train",), doc="module names that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_modules_to_save: list[str] = _field(
        stages=("train",), doc="modules trained in full beside the adapters (e.g. embed_tokens, lm_head)",
        factory=list)
    micro_batch_size: int = _field(4, stages=("train",), doc="rows per forward pass")
    gradient_accumulation_steps: int = _field(1, stages=("train",), doc="micro-batches per optimizer step")
    num_epochs: int = _field(1, stages=("train",), doc="passes over the training shards")
    max_steps: Optional[int] = _field(None, stages=("train",), doc="stop after this many optimizer steps")
    learning_rate: float = _field(2e-4, stages=("train",), doc="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _field("cosine", stages=("train",),
                                                                  doc="decay after warmup")
    warmup_steps: int = _field(0, stages=("train",), doc="linear warmup steps")
    weight_decay: float = _field(0.0, stages=("train",), doc="AdamW weight decay")
    max_grad_norm: float = _field(1.0, stages=("train",), doc="gradient clipping norm (0 disables)")
    gradient_checkpointing: bool = _field(False, stages=("train",), doc="recompute activations in backward")
    activation_offloading: bool = _field(False, stages=("train",),
                                         doc="with gradient_checkpointing: keep layer inputs in pinned CPU "
                                             "memory (triton engine)")
    train_engine: Literal["auto", "triton", "torch", "ddp", "fsdp", "deepspeed"] = _field(
        "auto", stages=("train",),
        doc="training engine; auto: triton on exactly one CUDA GPU, else torch; in a Slurm job with "
            "several ranks: ddp (replicated model, summed gradients), fsdp (FSDP2 per decoder layer) or "
            "deepspeed (ZeRO stage 2 or 3)")
    deepspeed_zero_stage: Literal[2, 3] = _field(
        2, stages=("train",), doc="deepspeed: ZeRO stage; 2 shards gradients and optimizer state, 3 also the weights")
    deepspeed_offload: Literal["none", "optimizer", "all"] = _field(
        "none", stages=("train",),
        doc="deepspeed: keep in CPU memory the optimizer state (optimizer) or also the weights (all, stage 3)")
    deepspeed_config: Optional[str] = _field(
        None, stages=("train",),
        doc="deepspeed: a DeepSpeed JSON used instead of the generated one; batch sizes, accumulation and "
            "clipping still come from config.yaml (the JSON may leave them out or write \"auto\")")
    rl: Optional[Literal["dpo", "orpo", "kto", "reward"]] = _field(
        None, stages=("train", "evaluate"),
        doc="preference objective on dpo (dpo, orpo, reward) or kto (kto) data; null: supervised fine-tuning; "
            "reward: a reward model (the decoder with a scalar score head) trained on the pairs")
    rl_beta: float = _field(0.1, stages=("train", "evaluate"),
                            doc="dpo/kto: strength of the pull to the reference model (Axolotl's rl_beta, "
                                "formerly dpo_beta); IPO: its tau")
    dpo_loss_type: Literal["sigmoid", "ipo"] = _field(
        "sigmoid", stages=("train",), doc="dpo loss: sigmoid (DPO) or ipo (squared, per-token log-ratios)")
    dpo_label_smoothing: float = _field(0.0, stages=("train",),
                                        doc="dpo sigmoid: assumed share of flipped labels (conservative DPO), "
                                            "in [0, 0.5)")
    orpo_alpha: float = _field(0.1, stages=("train",), doc="orpo: weight of the odds-ratio term beside the NLL")
    center_rewards_coefficient: float = _field(
        0.0, stages=("train",), doc="reward: weight of the (r_chosen + r_rejected)² term that keeps rewards "
                                    "centred on zero (TRL's name; 0 disables)")
    kto_desirable_weight: float = _field(1.0, stages=("train",), doc="kto: weight of desirable samples")
    kto_undesirable_weight: float = _field(1.0, stages=("train",), doc="kto: weight of undesirable samples")
    save_steps: int = _field(50, stages=("train",), doc="checkpoint every this many optimizer steps")
    keep_last_checkpoints: int = _field(2, stages=("train",), doc="complete checkpoints kept on disk")
    logging_steps: int = _field(1, stages=("train",), doc="steps between metric lines")
    seed: int = _field(42, stages=("tokenize", "train", "evaluate"), doc="seed for split, shuffle and init")
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", stages=("merge",), doc="dtype of the merged weights (auto: the base model's)")
    max_shard_size: str = _field("2GB", stages=("merge",), doc="safetensors shard size of the merged model")
    eval_max_samples: int = _field(200, stages=("evaluate",), doc="held-out prompts generated from")
    eval_max_new_tokens: int = _field(48, stages=("evaluate",), doc="generation length in evaluation")
    eval_temperature: float = _field(0.7, stages=("evaluate",), doc="temperature of the sampled answers")
    eval_top_p: float = _field(0.9, stages=("evaluate",), doc="nucleus share of the sampled answers")
    lm_eval_tasks: list[str] = _field(stages=("evaluate",), factory=list,
                                      doc="lm-evaluation-harness tasks (their data must be available offline)")
    wandb_project: Optional[str] = _field(None, stages=(), doc="Weights & Biases project (off when unset)")
    wandb_entity: Optional[str] = _field(None, stages=(), doc="Weights & Biases entity")
    wandb_name: Optional[str] = _field(None, stages=(), doc="Weights & Biases run name (default: the run's)")
    wandb_tags: list[str] = _field(stages=(), factory=list, doc="Weights & Biases tags")
    # logging settings change no output: stages=() keeps them from rerunning training
    wandb_mode: Literal["offline", "online", "disabled"] = _field(
        "offline", stages=(), doc="offline by default: compute nodes have no internet; `wandb sync` later")
    gguf_types: list[Literal["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]] = _field(
        stages=("export_gguf",), doc="GGUF files to write", factory=lambda: ["f16"])
    output_dir: str = _field("", stages=(), doc="run folder (default runs/{run})")

    def stage_slice(self, stage: str) -> dict[str, Any]:
        """The keys ``stage`` reads, as plain JSON-able values."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if stage in f.metadata["stages"]}

    def stage_hash(self, stage: str) -> str:
        """sha256 of the stage's config slice: recorded in the stage's outputs."""
        return hash_json(self.stage_slice(stage))


@dataclass(frozen=True)
class ClusterResources:
    """Slurm resources of one stage (``cluster.<stage>``); account/partition may come from the profile."""

    nodes: int = _field(1, stages=(), doc="nodes")
    gpus_per_node: int = _field(0, stages=(), doc="GPUs per node (= tasks per node)")
    cpus_per_task: int = _field(2, stages=(), doc="CPUs per task")
    mem_gb: float = _field(8, stages=(), doc="memory per node in GB")
    time: str = _field("01:00:00", stages=(), doc="wall-clock limit HH:MM:SS")
    partition: Optional[str] = _field(None, stages=(), doc="Slurm partition")
    account: Optional[str] = _field(None, stages=(), doc="Slurm account")
    qos: Optional[str] = _field(None, stages=(), doc="Slurm QOS")
    constraint: Optional[str] = _field(None, stages=(), doc="Slurm node constraint")
    tasks_per_node: Optional[int] = _field(None, stages=(),
                                           doc="tasks (ranks) per node (default: gpus_per_node, at least 1)")
    sbatch_args: list[str] = _field(stages=(), doc="extra sbatch options, e.g. ['--exclusive', "
                                                   "'--gres-flags=enforce-binding']", factory=list)
    signal_delay_s: int = _field(120, stages=(),
                                 doc="train job: seconds before the time limit when it checkpoints and requeues")


@dataclass(frozen=True)
class Config:
    """The whole config.yaml: runs by name, cluster resources by stage."""

    runs: dict[str, RunConfig]
    cluster: dict[str, ClusterResources]

    def run_dir(self, run: str) -> str:
        return self.runs[run].output_dir or f"runs/{run}"


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- validation

def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _closest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r} ({type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r} ({f.metadata['doc']})")
    return cls(**kwargs)


def _check_run(run: RunConfig, where: str, base_dir: Path) -> None:
    """Checks that need more than a type: files that must exist, values in range."""
    if not run.datasets:
        raise ConfigError(f"{where}.datasets: at least one dataset is needed")
    if run.adapter is None:
        raise ConfigError(f"{where}.adapter: full fine-tuning (adapter: null) is not supported by the train "
                          "stage yet; use adapter: lora or qlora")
    for i, ds in enumerate(run.datasets):
        key = f"{where}.datasets[{i}].path"
        if ds.path.startswith("https://") or ds.path.startswith("http://"):
            if not ds.sha256:
                raise ConfigError(f"{where}.datasets[{i}].sha256: required for the URL {ds.path!r}")
        elif not ds.path.startswith("hf:") and not (base_dir / ds.path).exists():
            raise ConfigError(f"{key}: file not found: {ds.path!r}")
        if ds.weight <= 0:
            raise ConfigError(f"{where}.datasets[{i}].weight: must be positive, got {ds.weight!r}")
    names = [ds.dataset_name for ds in run.datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.datasets: two datasets are named alike ({names}); set name: on one")
    model = run.base_model
    is_local = model.startswith((".", "/")) or (base_dir / model).exists()
    if is_local and not (base_dir / model).is_dir():
        raise ConfigError(f"{where}.base_model: folder not found: {model!r}")
    if model.startswith("builtin:"):
        if model.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise ConfigError(f"{where}.base_model: unknown built-in model {model!r}; "
                              f"built-ins are {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
    positive = ("sequence_len", "micro_batch_size", "gradient_accumulation_steps", "num_epochs",
                "lora_r", "save_steps", "keep_last_checkpoints", "logging_steps")
    for name in positive:
        if getattr(run, name) < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1, got {getattr(run, name)!r}")
    if run.rl == "reward":
        if run.center_rewards_coefficient < 0:
            raise ConfigError(f"{where}.center_rewards_coefficient: must be at least 0, "
                              f"got {run.center_rewards_coefficient!r}")
        for key in ("lora_target_modules", "lora_modules_to_save"):
            if "lm_head" in getattr(run, key):
                raise ConfigError(f"{where}.{key}: a reward model has no lm_head (its score head replaces it "
                                  "and is trained in full)")
    if run.rl is not None:
        if run.rl_beta <= 0:
            raise ConfigError(f"{where}.rl_beta: must be positive, got {run.rl_beta!r}")
        if not 0.0 <= run.dpo_label_smoothing < 0.5:
            raise ConfigError(f"{where}.dpo_label_smoothing: must be in [0, 0.5), got {run.dpo_label_smoothing!r}")
        want = "kto" if run.rl == "kto" else "dpo"
        wrong = [ds.dataset_name for ds in run.datasets if ds.type != want]
        if wrong:
            raise ConfigError(f"{where}.datasets: rl: {run.rl} trains on type: {want} data; "
                              f"{', '.join(repr(w) for w in wrong)} are not")
    # the preference and reward losses call the decoder and the head themselves (the head under
    # activation checkpointing): outside FSDP's root forward, and recomputed on ZeRO-3's released weights
    if run.rl is not None and (run.train_engine == "fsdp" or (run.train_engine == "deepspeed"
                                                              and run.deepspeed_zero_stage == 3)):
        raise ConfigError(f"{where}.train_engine: rl: {run.rl} does not run on "
                          f"{'fsdp' if run.train_engine == 'fsdp' else 'deepspeed with ZeRO stage 3'}; "
                          "use ddp or deepspeed_zero_stage: 2")
    if run.deepspeed_offload == "all" and run.deepspeed_zero_stage != 3:
        raise ConfigError(f"{where}.deepspeed_offload: all (weights too) needs deepspeed_zero_stage: 3")
    if run.deepspeed_config is not None:
        path = base_dir / run.deepspeed_config
        owned = owned_values(run.micro_batch_size, run.gradient_accumulation_steps, run.max_grad_norm, None)
        try:
            check_user_config(read_user_config(path), owned, str(path))
        except DeepSpeedConfigError as err:
            raise ConfigError(f"{where}.deepspeed_config: {err}") from None
    if run.max_steps is not None and run.max_steps < 1:
        raise ConfigError(f"{where}.max_steps: must be at least 1, got {run.max_steps!r}")
    if run.val_set_size <= 0:
        raise ConfigError(f"{where}.val_set_size: must be positive (a share < 1 or a row count), "
                          f"got {run.val_set_size!r}")


def parse_config(raw: Any, source: str = "config.yaml", base_dir: Path = Path(".")) -> Config:
    """Validate a loaded YAML document; raise ConfigError naming the key and value at fault."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'runs', got {type(raw).__name__}")
    top = ("defaults", "runs", "cluster")
    for key in raw:
        if key not in top:
            raise ConfigError(f"{source}: unknown top-level key {key!r}{_closest(str(key), top)}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: expected a mapping, got {defaults!r}")
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, dict) or not runs_raw:
        raise ConfigError(f"{source}: runs: expected a mapping of run names to settings")
    runs = {}
    for name, run_raw in runs_raw.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(f"{source}: runs.{name}: run names may hold letters, digits, '_', '.', '-'")
        where = f"{source}: runs.{name}"
        merged = {**defaults, **(run_raw or {})}
        for key in defaults:  # name an unknown default key where it was written
            if key not in {f.name for f in dataclasses.fields(RunConfig)}:
                _build(RunConfig, {key: defaults[key]}, f"{source}: defaults")
        run = _build(RunConfig, merged, where)
        _check_run(run, where, base_dir)
        runs[str(name)] = run
    cluster_raw = raw.get("cluster") or {}
    if not isinstance(cluster_raw, dict):
        raise ConfigError(f"{source}: cluster: expected a mapping of stage names to resources")
    cluster = {}
    for stage, res in cluster_raw.items():
        if stage not in STAGES:
            raise ConfigError(f"{source}: cluster: unknown stage {stage!r}{_closest(str(stage), STAGES)}")
        cluster[stage] = _build(ClusterResources, res, f"{source}: cluster.{stage}")
    return Config(runs=runs, cluster=cluster)


def load_config(path: str | Path) -> Config:
    """Read and validate config.yaml; paths in it are relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_config(raw, source=str(path), base_dir=Path("."))


def load_run(config_path: str | Path, run: str) -> tuple[Config, RunConfig]:
    """The whole config and run ``run`` of it; a ConfigError names the runs there are."""
    config = load_config(config_path)
    if run not in config.runs:
        raise ConfigError(f"{config_path}: no run named {run!r}; runs are {', '.join(config.runs)}")
    return config, config.runs[run]


# --------------------------------------------------------------------------- JSON schema

def _schema_of(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return {"anyOf": [_schema_of(inner[0]), {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(tp)[0])}
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


def _object_schema(cls: type, required: bool = True) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    needed = []
    for f in dataclasses.fields(cls):
        props[f.name] = {**_schema_of(hints[f.name]), "description": f.metadata["doc"]}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            needed.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required and needed:
        schema["required"] = needed
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (workflow/schemas/config.schema.json is generated from it)."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "tunedag config.yaml",
        "type": "object",
        "additionalProperties": False,
        "required": ["runs"],
        "properties": {
            "defaults": _object_schema(RunConfig, required=False),
            "runs": {"type": "object", "minProperties": 1,
                     "additionalProperties": {"anyOf": [_object_schema(RunConfig, required=False),
                                                        {"type": "null"}]}},
            "cluster": {"type": "object",
                        "propertyNames": {"enum": list(STAGES)},
                        "additionalProperties": _object_schema(ClusterResources)},
        },
    }


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
