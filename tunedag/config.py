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
import math
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
from tunedag.model_facts import (BUILTIN_MODEL_TYPE, LORA_TARGETS, VLLM_LORA_MODULES, VLLM_LORA_RANKS,
                                 max_positions, missing_modules, read_model_config)

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
    revision: Optional[str] = _field(None, stages=("download",),
                                     doc="hf: sources: the hub revision to read (a commit sha, tag or branch); "
                                         "a commit sha pins the data")
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
    base_model_revision: Optional[str] = _field(None, stages=("tokenize", "train", "merge", "evaluate"),
                                                doc="hub base_model: the revision to download (a commit sha, tag "
                                                    "or branch); a commit sha pins the weights")
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
    output_dir: str = _field("", stages=(), doc="run folder, relative to the work folder (default runs/{run})")

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
    time: str = _field("01:00:00", stages=(), doc="wall-clock limit HH:MM:SS, MM:SS or D-HH:MM:SS")
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
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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
        elif not ds.path.startswith("hf:") and not (base_dir / ds.path).is_file():
            what = "is a folder, not a file" if (base_dir / ds.path).is_dir() else "file not found"
            raise ConfigError(f"{key}: {what}: {ds.path!r}")
        if ds.weight <= 0:
            raise ConfigError(f"{where}.datasets[{i}].weight: must be positive, got {ds.weight!r}")
        if ds.revision is not None and not ds.path.startswith("hf:"):
            raise ConfigError(f"{where}.datasets[{i}].revision: applies to hf: sources only, not {ds.path!r} "
                              "(pin a URL with sha256:)")
        if not is_plain_name(ds.dataset_name):
            own = f"name: {ds.name!r} is" if ds.name else f"the name {ds.dataset_name!r} taken from the path is"
            raise ConfigError(f"{where}.datasets[{i}].{'name' if ds.name else 'path'}: {own} not {PLAIN_NAME_RULE} "
                              f"(it names the folder data/raw/<name>); set name: to one")
    names = [ds.dataset_name for ds in run.datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.datasets: two datasets are named alike ({names}); set name: on one")
    _check_output_dir(run.output_dir, where)
    _check_ranges(run, where)
    _check_base_model(run, where, base_dir)
    _check_adapter_serving(run, where)
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


# --------------------------------------------------------------------------- names, paths, times

# A name that becomes a path (run names, data/raw/<dataset>, output_dir's parts): never '.', '..',
# a hidden folder, a space or a shell character, so it stays where it is meant to be.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PLAIN_NAME_RULE = "a plain name (letters, digits, '_', '.', '-', starting with a letter or digit)"
# Top folders the workflow writes itself; a run folder inside them could overwrite their files.
WORKFLOW_FOLDERS = ("data", "models", "logs", "reports")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.,-]+")
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|*:!()\[\]-]+")
MAX_SHARD_SIZE = re.compile(r"[0-9]+(\.[0-9]+)?([KMG]I?B)?", re.IGNORECASE)
_TIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})|(\d+):(\d{2})")
TIME_FORMS = "HH:MM:SS, MM:SS or D-HH:MM:SS (sbatch --time)"


def is_plain_name(name: str) -> bool:
    return PLAIN_NAME.fullmatch(name) is not None


def time_minutes(text: str) -> int:
    """A Slurm time limit, ``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS``, in whole minutes (seconds round up)."""
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not {TIME_FORMS}")
    days, hours, mins, secs, short_m, short_s = (int(g) if g else 0 for g in match.groups())
    if match.group(5) is not None:
        mins, secs = short_m, short_s
    elif mins > 59 or (match.group(1) is not None and hours > 23):
        raise ValueError(f"{text!r} is not {TIME_FORMS}: minutes run to 59, hours after a day to 23")
    if secs > 59:
        raise ValueError(f"{text!r} is not {TIME_FORMS}: seconds run to 59")
    total = (days * 24 + hours) * 60 + mins + (secs > 0)
    if total < 1:
        raise ValueError(f"{text!r} is no time at all; give the job at least a minute")
    return total


def _check_output_dir(value: str, where: str) -> None:
    if not value:
        return
    parts = value.split("/")
    if value.startswith("/") or not all(is_plain_name(p) for p in parts):
        raise ConfigError(f"{where}.output_dir: {value!r} is not a folder inside the work folder; write a "
                          f"relative path whose parts are each {PLAIN_NAME_RULE}: no spaces, no '..', "
                          "e.g. runs/my-run")
    if parts[0] in WORKFLOW_FOLDERS:
        raise ConfigError(f"{where}.output_dir: {value!r} lies in {parts[0]}/, which the workflow writes itself; "
                          "use a folder outside " + ", ".join(f"{f}/" for f in WORKFLOW_FOLDERS) + ", e.g. runs/my-run")


def _check_ranges(run: RunConfig, where: str) -> None:
    """Numbers a job would otherwise take as they are, or fail on after work was done."""
    at_least_1 = ("sequence_len", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "lora_r",
                  "save_steps", "keep_last_checkpoints", "logging_steps", "eval_max_samples", "eval_max_new_tokens")
    for name in at_least_1:
        if getattr(run, name) < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1, got {getattr(run, name)!r}")
    at_least_0 = ("warmup_steps", "weight_decay", "max_grad_norm", "eval_temperature", "orpo_alpha",
                  "kto_desirable_weight", "kto_undesirable_weight")
    for name in at_least_0:
        if getattr(run, name) < 0:
            raise ConfigError(f"{where}.{name}: must be at least 0, got {getattr(run, name)!r}")
    for name in ("learning_rate", "lora_alpha"):
        if getattr(run, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be positive, got {getattr(run, name)!r}")
    if not 0.0 <= run.lora_dropout < 1.0:
        raise ConfigError(f"{where}.lora_dropout: must be in [0, 1), got {run.lora_dropout!r}")
    if not 0.0 < run.eval_top_p <= 1.0:
        raise ConfigError(f"{where}.eval_top_p: must be in (0, 1], got {run.eval_top_p!r}")
    if run.val_set_size >= 1 and run.val_set_size != int(run.val_set_size):
        raise ConfigError(f"{where}.val_set_size: a share is below 1 and a row count is whole, "
                          f"got {run.val_set_size!r}")
    if not MAX_SHARD_SIZE.fullmatch(run.max_shard_size):
        raise ConfigError(f"{where}.max_shard_size: {run.max_shard_size!r} is not a size such as 2GB, 500MB or 5GiB")
    if not run.lora_target_modules:
        raise ConfigError(f"{where}.lora_target_modules: at least one module is needed")


def _base_model_config(run: RunConfig, base_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json as a dict where it is readable now (built-in or local), and its name."""
    model = run.base_model
    if model.startswith("builtin:"):
        return {"model_type": BUILTIN_MODEL_TYPE, **BUILTIN_MODELS[model.removeprefix("builtin:")]}, model
    return read_model_config(base_dir / model), f"{model}/config.json"


def check_model_fits(run: RunConfig, model_config: dict[str, Any], where: str, what: str) -> None:
    """Refuse a sequence_len past the model's positions, or LoRA targets its architecture lacks."""
    limit = max_positions(model_config)
    if limit is not None and run.sequence_len > limit[1]:
        raise ConfigError(f"{where}.sequence_len: {run.sequence_len} is longer than the model's {limit[0]} "
                          f"{limit[1]} ({what}); use at most {limit[1]}")
    missing = missing_modules(model_config, run.lora_target_modules)
    if missing:
        raise ConfigError(f"{where}.lora_target_modules: a {model_config.get('model_type')} model has no module "
                          f"named {', '.join(repr(m) for m in missing)} ({what}); its projections are "
                          f"{', '.join(LORA_TARGETS)}")


def _check_base_model(run: RunConfig, where: str, base_dir: Path) -> None:
    model = run.base_model
    is_local = model.startswith((".", "/")) or (base_dir / model).exists()
    if is_local and not (base_dir / model).is_dir():
        raise ConfigError(f"{where}.base_model: folder not found: {model!r}")
    if model.startswith("builtin:"):
        if model.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise ConfigError(f"{where}.base_model: unknown built-in model {model!r}; "
                              f"built-ins are {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
    elif not is_local and (not HUB_ID.fullmatch(model) or "--" in model or ".." in model):
        raise ConfigError(f"{where}.base_model: {model!r} is not builtin:<name>, an existing local folder, or a "
                          "hub id org/name (letters, digits, '_', '.', '-')")
    if run.base_model_revision is not None and (is_local or model.startswith("builtin:")):
        raise ConfigError(f"{where}.base_model_revision: applies to hub models only, and {model!r} is not one")
    if run.base_model_revision is not None and not is_plain_name(run.base_model_revision):
        raise ConfigError(f"{where}.base_model_revision: {run.base_model_revision!r} is not {PLAIN_NAME_RULE} "
                          "(it names the folder models/hub/<org>--<name>@<revision>; a commit sha or tag is)")
    model_config, what = _base_model_config(run, base_dir)
    if model_config is not None:
        check_model_fits(run, model_config, where, what)


def _check_adapter_serving(run: RunConfig, where: str) -> None:
    """export_vllm runs for every run: refuse now what it would refuse after training."""
    if run.lora_r not in VLLM_LORA_RANKS:
        raise ConfigError(f"{where}.lora_r: vLLM serves LoRA ranks {', '.join(map(str, VLLM_LORA_RANKS))} "
                          f"only, got {run.lora_r} (the export_vllm stage runs for every run)")
    unserved = [m for m in run.lora_target_modules if m not in VLLM_LORA_MODULES]
    if unserved:
        raise ConfigError(f"{where}.lora_target_modules: vLLM's LoRA layers do not cover "
                          f"{', '.join(repr(m) for m in unserved)} (the export_vllm stage runs for every run); "
                          f"use {', '.join(sorted(VLLM_LORA_MODULES))}")


def _check_across_runs(runs: dict[str, RunConfig], source: str) -> None:
    """Two runs must not share a run folder, nor one dataset name for two sources."""
    dirs = {name: (run.output_dir or f"runs/{name}") for name, run in runs.items()}
    names = list(dirs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            da, db = dirs[a], dirs[b]
            if da == db:
                raise ConfigError(f"{source}: runs.{a} and runs.{b} both write to {da!r}; give each its own "
                                  "output_dir (one would overwrite the other)")
            if da.startswith(db + "/") or db.startswith(da + "/"):
                raise ConfigError(f"{source}: runs.{a} writes to {da!r} and runs.{b} to {db!r}: one run folder "
                                  "lies inside the other; give each its own output_dir")
    seen: dict[str, tuple[str, DatasetConfig]] = {}
    for name, run in runs.items():
        for ds in run.datasets:
            first = seen.setdefault(ds.dataset_name, (name, ds))
            if first[1] != ds:
                raise ConfigError(f"{source}: runs.{first[0]} and runs.{name} use the dataset name "
                                  f"{ds.dataset_name!r} for two different sources; set name: on one of them")


def _check_cluster(res: ClusterResources, where: str) -> None:
    for name in ("nodes", "cpus_per_task"):
        if getattr(res, name) < 1:
            raise ConfigError(f"{where}.{name}: must be at least 1, got {getattr(res, name)!r}")
    for name in ("gpus_per_node", "signal_delay_s"):
        if getattr(res, name) < 0:
            raise ConfigError(f"{where}.{name}: must be at least 0, got {getattr(res, name)!r}")
    if res.tasks_per_node is not None and res.tasks_per_node < 1:
        raise ConfigError(f"{where}.tasks_per_node: must be at least 1, got {res.tasks_per_node!r}")
    if res.mem_gb <= 0:
        raise ConfigError(f"{where}.mem_gb: must be positive, got {res.mem_gb!r}")
    try:
        time_minutes(res.time)
    except ValueError as err:
        raise ConfigError(f"{where}.time: {err}") from None
    for name in ("partition", "account", "qos"):
        value = getattr(res, name)
        if value is not None and not SLURM_NAME.fullmatch(value):
            raise ConfigError(f"{where}.{name}: {value!r} is not a Slurm name (letters, digits, '_', '.', ',', '-')")
    if res.constraint is not None and not SLURM_CONSTRAINT.fullmatch(res.constraint):
        raise ConfigError(f"{where}.constraint: {res.constraint!r} is not a Slurm constraint "
                          "(features joined by & | , with [ ] * : ! ( ); no spaces)")
    for arg in res.sbatch_args:
        if not re.fullmatch(r"--[a-z][a-z-]*(=\S+)?", arg):
            raise ConfigError(f"{where}.sbatch_args: {arg!r} is not a long sbatch option (--name or --name=value)")


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
        if not is_plain_name(str(name)):
            raise ConfigError(f"{source}: runs: the run name {str(name)!r} is not {PLAIN_NAME_RULE}; "
                              f"it names the folders data/packed/<run> and runs/<run>")
        where = f"{source}: runs.{name}"
        merged = {**defaults, **(run_raw or {})}
        for key in defaults:  # name an unknown default key where it was written
            if key not in {f.name for f in dataclasses.fields(RunConfig)}:
                _build(RunConfig, {key: defaults[key]}, f"{source}: defaults")
        run = _build(RunConfig, merged, where)
        _check_run(run, where, base_dir)
        runs[str(name)] = run
    _check_across_runs(runs, source)
    cluster_raw = raw.get("cluster") or {}
    if not isinstance(cluster_raw, dict):
        raise ConfigError(f"{source}: cluster: expected a mapping of stage names to resources")
    cluster = {}
    for stage, res in cluster_raw.items():
        if stage not in STAGES:
            raise ConfigError(f"{source}: cluster: unknown stage {stage!r}{_closest(str(stage), STAGES)}")
        cluster[stage] = _build(ClusterResources, res, f"{source}: cluster.{stage}")
        _check_cluster(cluster[stage], f"{source}: cluster.{stage}")
    return Config(runs=runs, cluster=cluster)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error, not the last one wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; keys written beside it override on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base loader names it
            if earlier != line:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (line {earlier} "
                                  "sets it too, and YAML would keep only the last); remove one")
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's document; ConfigError naming file and line for bad YAML or a duplicate key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_config(path: str | Path) -> Config:
    """Read and validate config.yaml; paths in it are relative to the working directory."""
    return parse_config(load_yaml(path), source=str(path), base_dir=Path("."))


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
