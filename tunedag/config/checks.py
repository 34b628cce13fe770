"""What a config value must satisfy beyond its type, checked before any job starts: files that must
exist, values in range, names that become paths, the model's context and modules, what vLLM can
serve, the user's DeepSpeed JSON, Slurm resources. Each failure is one ConfigError naming the key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunedag.builtin_models import BUILTIN_MODELS
from tunedag.config.fields import ClusterResources, ConfigError, DatasetConfig, Problems, RunConfig
from tunedag.deepspeed_json import DeepSpeedConfigError, check_user_config, owned_values, read_user_config
from tunedag.model_facts import (BUILTIN_MODEL_TYPE, LORA_TARGETS, VLLM_LORA_MODULES, VLLM_LORA_RANKS,
                                 max_positions, missing_modules, read_model_config)

def check_run(run: RunConfig, where: str, base_dir: Path) -> None:
    """Checks that need more than a type: files that must exist, values in range. Every check runs,
    and one ConfigError lists all that fail."""
    problems = Problems()
    for i, ds in enumerate(run.datasets):
        with problems.check():
            _check_dataset(ds, f"{where}.datasets[{i}]", base_dir)
    checks = (lambda: _check_dataset_names(run, where), lambda: _check_output_dir(run.output_dir, where),
              lambda: _check_ranges(run, where), lambda: _check_base_model(run, where, base_dir),
              lambda: _check_adapter(run, where), lambda: _check_objective(run, where),
              lambda: _check_jinja(run.chat_template, run.chat_template_jinja, where),
              lambda: _check_engine(run, where, base_dir), lambda: _check_eval_schedule(run, where),
              lambda: _check_low_precision(run, where), lambda: _check_tokens(run, where),
              lambda: _check_master_weights(run, where))
    for check in checks:
        with problems.check():
            check()
    problems.raise_if_any()


def _check_jinja(choice: str | None, jinja: str | None, where: str) -> None:
    """chat_template: jinja renders chat_template_jinja, which nothing else reads."""
    if choice == "jinja" and not (jinja and "{" in jinja):
        raise ConfigError(f"{where}.chat_template_jinja: chat_template: jinja needs the template text here "
                          f"(a file's path is not read), got {jinja!r}")
    if jinja is not None and choice != "jinja":
        raise ConfigError(f"{where}.chat_template_jinja: used only with chat_template: jinja, which is "
                          f"{choice!r} here")


def _check_dataset(ds: DatasetConfig, where: str, base_dir: Path) -> None:
    _check_jinja(ds.chat_template, ds.chat_template_jinja, where)
    if ds.path.startswith("https://") or ds.path.startswith("http://"):
        if not ds.sha256:
            raise ConfigError(f"{where}.sha256: required for the URL {ds.path!r}")
    elif not ds.path.startswith("hf:") and not (base_dir / ds.path).is_file():
        what = "is a folder, not a file" if (base_dir / ds.path).is_dir() else "file not found"
        hub = (f" (a hub dataset? write hf:{ds.path})" if HUB_ID.fullmatch(ds.path) and "/" in ds.path
               and not Path(ds.path).suffix else "")
        raise ConfigError(f"{where}.path: {what}: {ds.path!r}{hub}")
    if ds.weight <= 0:
        raise ConfigError(f"{where}.weight: must be positive, got {ds.weight!r}")
    if ds.drop_system_message and ds.type not in ("sharegpt", "chat_template"):
        raise ConfigError(f"{where}.drop_system_message: applies to conversations (type: chat_template or "
                          f"sharegpt), not type: {ds.type}")
    if ds.max_completion_length is not None and ds.max_completion_length < 1:
        raise ConfigError(f"{where}.max_completion_length: must be at least 1 (null: no limit), "
                          f"got {ds.max_completion_length!r}")
    if ds.alpaca_style is not None and ds.type != "alpaca":
        raise ConfigError(f"{where}.alpaca_style: applies to type: alpaca, not type: {ds.type}")
    if ds.revision is not None and not ds.path.startswith("hf:"):
        raise ConfigError(f"{where}.revision: applies to hf: sources only, not {ds.path!r} "
                          "(pin a URL with sha256:)")
    for key in ("max_rows", "max_words"):  # the leading rows of a streamed hub split
        bound = getattr(ds, key)
        if bound is not None and not ds.path.startswith("hf:"):
            raise ConfigError(f"{where}.{key}: applies to hf: sources (streamed) only, not {ds.path!r}")
        if bound is not None and bound < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {bound!r}")
    if not is_plain_name(ds.dataset_name):
        own = f"name: {ds.name!r} is" if ds.name else f"the name {ds.dataset_name!r} taken from the path is"
        raise ConfigError(f"{where}.{'name' if ds.name else 'path'}: {own} not {PLAIN_NAME_RULE} "
                          f"(it names the folder data/raw/<name>); set name: to one")


def _check_dataset_names(run: RunConfig, where: str) -> None:
    if not run.datasets:
        raise ConfigError(f"{where}.datasets: at least one dataset is needed")
    seen: dict[str, DatasetConfig] = {}
    for ds in run.datasets:  # a source listed twice shares its download (both copies train, as in Axolotl)
        first = seen.setdefault(ds.dataset_name, ds)
        if first is not ds and first.download_slice() != ds.download_slice():
            raise ConfigError(f"{where}.datasets: two different sources are named {ds.dataset_name!r} "
                              f"({first.path!r} and {ds.path!r}); set name: on one")


def _check_objective(run: RunConfig, where: str) -> None:
    """The preference and reward settings, and the data their objective trains on."""
    if run.rl == "reward" and run.center_rewards_coefficient < 0:
        raise ConfigError(f"{where}.center_rewards_coefficient: must be at least 0, "
                          f"got {run.center_rewards_coefficient!r}")
    if run.trains_classifier:
        for key in ("lora_target_modules", "lora_modules_to_save"):
            if "lm_head" in getattr(run, key):
                raise ConfigError(f"{where}.{key}: a reward model has no lm_head (its score head replaces it "
                                  "and is trained in full)")
    stepwise = [ds for ds in run.datasets if ds.type == "stepwise_supervised"]
    if stepwise and run.rl != "prm":
        raise ConfigError(f"{where}.datasets: {stepwise[0].dataset_name!r} is type: stepwise_supervised, which "
                          "trains a process reward model: set rl: prm (Axolotl's process_reward_model: true)")
    if run.precompute_ref_log_probs and not run.compares_with_reference:
        raise ConfigError(f"{where}.precompute_ref_log_probs: only dpo and kto compare with a reference model; "
                          f"rl: {run.rl or 'null'} has none to precompute")
    if run.rl is not None:
        if run.rl_beta <= 0:
            raise ConfigError(f"{where}.rl_beta: must be positive, got {run.rl_beta!r}")
        if not 0.0 <= run.dpo_label_smoothing < 0.5:
            raise ConfigError(f"{where}.dpo_label_smoothing: must be in [0, 0.5), got {run.dpo_label_smoothing!r}")
        want = {"kto": "kto", "prm": "stepwise_supervised"}.get(run.rl, "dpo")
        wrong = [ds.dataset_name for ds in run.datasets if ds.type != want]
        if wrong:
            raise ConfigError(f"{where}.datasets: rl: {run.rl} trains on type: {want} data; "
                              f"{', '.join(repr(w) for w in wrong)} are not")


def _check_engine(run: RunConfig, where: str, base_dir: Path) -> None:
    """What the chosen training engine cannot run, and the user's DeepSpeed JSON."""
    # the preference and reward losses call the decoder and the head themselves (the head under
    # activation checkpointing): outside FSDP's root forward, and recomputed on ZeRO-3's released weights;
    # a full fine-tune's reference model would also need sharding there
    if run.rl is not None and (run.train_engine == "fsdp" or (run.train_engine == "deepspeed"
                                                              and run.deepspeed_zero_stage == 3)):
        raise ConfigError(f"{where}.train_engine: rl: {run.rl} does not run on "
                          f"{'fsdp' if run.train_engine == 'fsdp' else 'deepspeed with ZeRO stage 3'}; "
                          "use ddp or deepspeed_zero_stage: 1 or 2")
    if run.deepspeed_offload == "all" and run.deepspeed_zero_stage != 3:
        raise ConfigError(f"{where}.deepspeed_offload: all (weights too) needs deepspeed_zero_stage: 3")
    if run.deepspeed_config is not None:
        path = base_dir / run.deepspeed_config
        owned = owned_values(run.micro_batch_size, run.gradient_accumulation_steps, run.max_grad_norm, None)
        try:
            user = read_user_config(path)
            check_user_config(user, owned, str(path))
        except DeepSpeedConfigError as err:
            raise ConfigError(f"{where}.deepspeed_config: {err}") from None
        if run.rl is not None and user["zero_optimization"]["stage"] == 3:
            raise ConfigError(f"{where}.deepspeed_config: {path} runs ZeRO stage 3, on which rl: {run.rl} does "
                              "not run; use a stage 1 or 2 JSON")


KAHAN_OPTIMIZERS = ("adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit")  # AdamWs with a KahanAdamW form


def _check_master_weights(run: RunConfig, where: str) -> None:
    """bf16_kahan: a full fine-tune, an AdamW that compensates its rounding, an engine that keeps bf16 weights."""
    if run.master_weights == "fp32":
        return
    key = f"{where}.master_weights"
    if run.adapter is not None:
        raise ConfigError(f"{key}: bf16_kahan applies to full fine-tuning (adapter: null); a {run.adapter} "
                          "adapter's few weights stay fp32")
    if run.optimizer not in KAHAN_OPTIMIZERS:
        raise ConfigError(f"{key}: bf16_kahan needs optimizer {', '.join(KAHAN_OPTIMIZERS)} (AdamW with a Kahan-"
                          f"compensated bf16 update); {run.optimizer} would round small updates away")
    if run.train_engine == "deepspeed":
        raise ConfigError(f"{key}: bf16_kahan runs on the triton, torch, ddp and fsdp engines; DeepSpeed keeps "
                          "its own fp32 master weights")
    if run.qat is not None or run.fp8:
        raise ConfigError(f"{key}: bf16_kahan is not offered with {'qat' if run.qat is not None else 'fp8'} "
                          "(their layers expect fp32 weights); use master_weights: fp32")


QAT_PAIRS = {("int4", "int8"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")}  # (weights, activations) offered
QAT_BLOCKS = {"mxfp4": 32, "nvfp4": 16}  # the formats' fixed block sizes


def _check_low_precision(run: RunConfig, where: str) -> None:
    """qat and fp8: a full fine-tune on the torch, ddp or fsdp engine, with a weight/activation pair offered."""
    keys = [k for k in ("qat", "fp8") if getattr(run, k)]
    if run.fp8_enable_fsdp_float8_all_gather and (not run.fp8 or run.train_engine != "fsdp"):
        raise ConfigError(f"{where}.fp8_enable_fsdp_float8_all_gather: applies to fp8: true on train_engine: fsdp")
    if not keys:
        return
    if len(keys) == 2:
        raise ConfigError(f"{where}.fp8: beside qat; a run trains with one of them")
    key = keys[0]
    if run.adapter is not None:
        raise ConfigError(f"{where}.{key}: trains every weight: set adapter: null (a full fine-tune), not "
                          f"adapter: {run.adapter}")
    if run.train_engine in ("triton", "deepspeed"):
        raise ConfigError(f"{where}.{key}: runs on the torch, ddp and fsdp engines (train_engine: auto picks "
                          f"them), not train_engine: {run.train_engine}")
    qat = run.qat
    if qat is None:
        return
    if (qat.weight_dtype, qat.activation_dtype) not in QAT_PAIRS:
        raise ConfigError(f"{where}.qat: weight_dtype {qat.weight_dtype} with activation_dtype "
                          f"{qat.activation_dtype} is not offered; the pairs are int4 weights with int8 "
                          "activations, mxfp4 with mxfp4 and nvfp4 with nvfp4")
    fixed = QAT_BLOCKS.get(qat.weight_dtype)
    if qat.group_size is not None and (qat.group_size < 2 if fixed is None else qat.group_size != fixed):
        need = "at least 2" if fixed is None else f"{fixed} (or null)"
        raise ConfigError(f"{where}.qat.group_size: {qat.weight_dtype} takes {need}, got {qat.group_size}")
    if qat.fake_quant_after_n_steps is not None and qat.fake_quant_after_n_steps < 0:
        raise ConfigError(f"{where}.qat.fake_quant_after_n_steps: must be 0 or more, got "
                          f"{qat.fake_quant_after_n_steps}")


def _check_tokens(run: RunConfig, where: str) -> None:
    """special_tokens and tokens name tokens: an empty one would be dropped without a word."""
    special = run.special_tokens
    named = [(f"special_tokens.{role}", getattr(special, role)) for role in ("bos_token", "eos_token", "pad_token",
                                                                           "unk_token") if special] + \
            [(f"special_tokens.additional_special_tokens[{i}]", t)
             for i, t in enumerate(special.additional_special_tokens if special else [])] + \
            [(f"tokens[{i}]", t) for i, t in enumerate(run.tokens)]
    empty = [key for key, text in named if text is not None and not text.strip()]
    if empty:
        raise ConfigError(f"{where}.{empty[0]}: an empty token; give the token's text (e.g. <|im_end|>)")


def _check_eval_schedule(run: RunConfig, where: str) -> None:
    """Evaluation during training: one schedule at most, and early stopping only on a schedule."""
    keys = ("eval_steps", "evals_per_epoch", "eval_batch_size", "early_stopping_patience")
    low = [f"{where}.{k}: must be at least 1 (or null), got {getattr(run, k)!r}" for k in keys
           if getattr(run, k) is not None and getattr(run, k) < 1]
    if low:
        raise ConfigError(*low)
    if run.eval_steps is not None and run.evals_per_epoch is not None:
        raise ConfigError(f"{where}.eval_steps and evals_per_epoch: both set ({run.eval_steps}, "
                          f"{run.evals_per_epoch}); set one of them and the other to null")
    if run.early_stopping_patience is not None and run.eval_steps is None and run.evals_per_epoch is None:
        raise ConfigError(f"{where}.early_stopping_patience: needs evaluations to count: set eval_steps or "
                          "evals_per_epoch")


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
    problems = []
    at_least_1 = ("sequence_len", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "lora_r",
                  "save_steps", "keep_last_checkpoints", "logging_steps", "eval_max_samples", "eval_max_new_tokens")
    problems += [f"{where}.{name}: must be at least 1, got {getattr(run, name)!r}"
                 for name in at_least_1 if getattr(run, name) < 1]
    at_least_0 = ("warmup_steps", "gradient_checkpointing_skip_layers", "weight_decay", "max_grad_norm",
                  "eval_temperature", "orpo_alpha", "kto_desirable_weight", "kto_undesirable_weight")
    problems += [f"{where}.{name}: must be at least 0, got {getattr(run, name)!r}"
                 for name in at_least_0 if getattr(run, name) < 0]
    problems += [f"{where}.{name}: must be positive, got {getattr(run, name)!r}"
                 for name in ("learning_rate", "lora_alpha") if getattr(run, name) <= 0]
    if run.max_steps is not None and run.max_steps < 1:
        problems.append(f"{where}.max_steps: must be at least 1, got {run.max_steps!r}")
    if run.warmup_ratio is not None and not 0.0 <= run.warmup_ratio < 1.0:
        problems.append(f"{where}.warmup_ratio: must be in [0, 1), got {run.warmup_ratio!r}")
    if run.warmup_ratio is not None and run.warmup_steps:
        problems.append(f"{where}.warmup_ratio: set beside warmup_steps {run.warmup_steps}; set one of them")
    problems += schedule_problems(run, where)
    if run.saves_per_epoch is not None and run.saves_per_epoch < 1:
        problems.append(f"{where}.saves_per_epoch: must be at least 1, got {run.saves_per_epoch!r}")
    problems += [f"{where}.{name}: must be in [0, 1), got {getattr(run, name)!r}"
                 for name in ("adam_beta1", "adam_beta2") if not 0.0 <= getattr(run, name) < 1.0]
    if run.adam_epsilon <= 0:
        problems.append(f"{where}.adam_epsilon: must be positive, got {run.adam_epsilon!r}")
    if not 0.0 <= run.lora_dropout < 1.0:
        problems.append(f"{where}.lora_dropout: must be in [0, 1), got {run.lora_dropout!r}")
    if not 0.0 < run.eval_top_p <= 1.0:
        problems.append(f"{where}.eval_top_p: must be in (0, 1], got {run.eval_top_p!r}")
    if run.val_set_size <= 0:
        problems.append(f"{where}.val_set_size: must be positive (a share < 1 or a row count), "
                        f"got {run.val_set_size!r}")
    elif run.val_set_size >= 1 and run.val_set_size != int(run.val_set_size):
        problems.append(f"{where}.val_set_size: a share is below 1 and a row count is whole, "
                        f"got {run.val_set_size!r}")
    if not MAX_SHARD_SIZE.fullmatch(run.max_shard_size):
        problems.append(f"{where}.max_shard_size: {run.max_shard_size!r} is not a size such as 2GB, 500MB or 5GiB")
    if not run.lora_target_modules:
        problems.append(f"{where}.lora_target_modules: at least one module is needed")
    if problems:
        raise ConfigError(*problems)


def schedule_problems(run: RunConfig, where: str) -> list[str]:
    """The cosine floor and hold (Axolotl's meaning: both shares of something, both for lr_scheduler: cosine),
    and an optimizer that the engine's parameters cannot take."""
    problems = [f"{where}.{name}: must be in [0, 1], got {getattr(run, name)!r}"
                for name in ("cosine_min_lr_ratio", "cosine_constant_lr_ratio")
                if getattr(run, name) is not None and not 0.0 <= getattr(run, name) <= 1.0]
    if run.lr_scheduler != "cosine":
        problems += [f"{where}.{name}: shapes lr_scheduler: cosine, but the run's is {run.lr_scheduler}"
                     for name in ("cosine_min_lr_ratio", "cosine_constant_lr_ratio") if getattr(run, name) is not None]
    if run.cosine_constant_lr_ratio and not run.cosine_min_lr_ratio:
        problems.append(f"{where}.cosine_constant_lr_ratio: holds the cosine's floor, so it needs a "
                        "cosine_min_lr_ratio above 0")
    if run.optimizer == "muon" and run.train_engine == "deepspeed":
        problems.append(f"{where}.optimizer: muon orthogonalises whole weight matrices, which DeepSpeed's flat "
                        "ZeRO partitions do not keep; use train_engine: fsdp (or ddp)")
    return problems


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


# Axolotl's row-range suffix (``embed_tokens.weight$[:32000]``: train some rows only): tunedag trains whole tensors
_ROW_RANGE = re.compile(r"\[\d*:\d*\]$")


def _check_adapter(run: RunConfig, where: str) -> None:
    """Full fine-tuning (adapter: null) and its keys; or the LoRA adapter that vLLM must serve."""
    if run.train_engine == "deepspeed" and run.deepspeed_offload != "none" and run.optimizer != "adamw_torch":
        raise ConfigError(f"{where}.optimizer: deepspeed_offload: {run.deepspeed_offload} updates on the CPU "
                          f"with DeepSpeed's CPU Adam; use optimizer: adamw_torch, or deepspeed_offload: none")
    if run.adapter is not None:
        if run.reinit_weights:
            raise ConfigError(f"{where}.reinit_weights: trains a model from its random initialisation, so every "
                              f"weight must train: use adapter: null (an adapter over random weights learns "
                              f"nothing of use, and the merge would not have those weights)")
        if run.unfrozen_parameters:
            raise ConfigError(f"{where}.unfrozen_parameters: applies to full fine-tuning (adapter: null) only; "
                              f"with adapter: {run.adapter} use lora_modules_to_save")
        if run.keep_sparsity:
            raise ConfigError(f"{where}.keep_sparsity: applies to full fine-tuning (adapter: null) only: a merged "
                              f"{run.adapter} adapter adds a dense update to every weight")
        _check_adapter_serving(run, where)
        return
    for i, pattern in enumerate(run.unfrozen_parameters):
        if _ROW_RANGE.search(pattern):
            raise ConfigError(f"{where}.unfrozen_parameters[{i}]: {pattern!r} ends in a row range, which tunedag "
                              "does not support (it trains whole tensors); drop the [start:end]")
    for key in ("unfrozen_parameters", "keep_sparsity"):
        for i, pattern in enumerate(getattr(run, key)):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{where}.{key}[{i}]: {pattern!r} is not a Python regular expression "
                                  f"({err})") from None
    if run.keep_sparsity and run.train_engine == "deepspeed":
        raise ConfigError(f"{where}.keep_sparsity: DeepSpeed keeps the weights and gradients in its own partitions; "
                          "use train_engine: fsdp (or ddp, triton, torch) for sparse fine-tuning")


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


def check_across_runs(runs: dict[str, RunConfig], source: str) -> None:
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
            if first[1].download_slice() != ds.download_slice():
                raise ConfigError(f"{source}: runs.{first[0]} and runs.{name} use the dataset name "
                                  f"{ds.dataset_name!r} for two different sources; set name: on one of them")


def check_cluster(res: ClusterResources, where: str) -> None:
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
