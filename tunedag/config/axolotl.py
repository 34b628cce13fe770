"""Axolotl configs as written: a run given as ``axolotl: path/to/config.yml``, or with Axolotl's keys
inline, becomes a tunedag run.

:func:`translate` takes one run's raw mapping (``defaults`` merged in) and returns the tunedag mapping
and the notes to log. Keys tunedag holds under the same name pass through; the keys of
:mod:`tunedag.config.axolotl_keys` are translated, accepted with a note, or refused with what tunedag
does instead. A run is read in Axolotl's terms when it names a file with ``axolotl:`` or sets any key
only Axolotl has; then, as in Axolotl, a run without ``adapter`` is a full fine-tune.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

from tunedag.config import pretraining
from tunedag.config.axolotl_keys import DATASET_REFUSED_KEYS, IGNORED_KEYS, REFUSED_KEYS, TRANSLATED
from tunedag.config.fields import ConfigError, Problems, RunConfig

FILE_KEY = "axolotl"
TUNEDAG_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
# keys only Axolotl has: a tunedag key of the same name means the same and passes through
AXOLOTL_ONLY = {*TRANSLATED, *IGNORED_KEYS, *REFUSED_KEYS} - TUNEDAG_KEYS
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".gz")
HUB_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
LIGER_PLUGINS = ("liger", "cut_cross_entropy")
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}


SECRET_KEY = re.compile(r"api_key|_token$|secret|password")  # their values never reach a log or a saved config


def shown(key: str, value: Any) -> str:
    """``value`` as a note or a refusal may print it: a secret's value is hidden."""
    return "'***'" if SECRET_KEY.search(key) else repr(value)


def asks_nothing(value: Any) -> bool:
    """null, false or empty: the setting is off, so no key is refused for it."""
    return value is None or value is False or value == "" or value == [] or value == {}


def is_axolotl_run(raw: dict[str, Any]) -> bool:
    return FILE_KEY in raw or any(key in AXOLOTL_ONLY for key in raw)


def read_file(raw: dict[str, Any], where: str, base_dir: Path,
              load: Callable[[Path], Any]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with the Axolotl file named by ``axolotl:`` read in (the file's keys under the run's own), and
    a note for each key of the file that neither Axolotl's schema nor tunedag holds: Axolotl ignores such a
    key, and so does a file run as written. A key written in tunedag's config is still checked."""
    if FILE_KEY not in raw:
        return raw, []
    path = raw[FILE_KEY]
    if not isinstance(path, str):
        raise ConfigError(f"{where}.{FILE_KEY}: expected the path of an Axolotl YAML file, got {path!r}")
    document = load(base_dir / path)
    if not isinstance(document, dict):
        raise ConfigError(f"{where}.{FILE_KEY}: {path!r} is not a mapping of Axolotl keys")
    own = {k: v for k, v in raw.items() if k != FILE_KEY}
    foreign = [k for k in document if k not in own and k not in TUNEDAG_KEYS and k not in AXOLOTL_ONLY]
    notes = [f"{where}.{k} = {shown(str(k), document[k])}: not a key of Axolotl's schema or tunedag's; ignored, as "
             f"Axolotl ignores it ({path})" for k in foreign]
    return {**{k: v for k, v in document.items() if k not in foreign}, **own}, notes


def translate(raw: dict[str, Any], where: str, base_dir: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """The tunedag mapping of an Axolotl-style run (refused keys left out), one note per key accepted
    without effect, and one problem per refused key."""
    notes: list[str] = []
    problems = Problems()
    out: dict[str, Any] = {}
    unset = sorted(k for k, v in raw.items() if v is None and k in AXOLOTL_ONLY)
    if unset:
        notes.append(f"{where}: unset (null) in the Axolotl config: {', '.join(unset)}")
    for key, value in raw.items():
        if value is None and key in AXOLOTL_ONLY:
            continue
        if key not in AXOLOTL_ONLY:
            out[key] = value
        elif key in REFUSED_KEYS:
            if not asks_nothing(value):
                problems.found.append(f"{where}.{key}: Axolotl's {key} = {shown(key, value)} is not offered: "
                                      f"{REFUSED_KEYS[key]}; remove the key")
        elif key in IGNORED_KEYS:
            if not asks_nothing(value):
                notes.append(f"{where}.{key} = {shown(key, value)}: no effect in tunedag: {IGNORED_KEYS[key]}")
    with problems.check():
        _translate_keys(raw, out, notes, where)
    if not asks_nothing(raw.get(pretraining.KEY)):
        with problems.check():
            out["datasets"] = [pretraining.pretraining_entry(raw, where, base_dir, notes)]
    if "datasets" in out:
        out["datasets"] = _translate_datasets(out["datasets"], f"{where}.datasets", base_dir, notes, raw.get("rl"),
                                              problems)
    template = out.get("chat_template_jinja")
    if isinstance(template, str) and "{" not in template:
        with problems.check():
            out["chat_template_jinja"] = read_template(template, f"{where}.chat_template_jinja", base_dir)
    if "output_dir" in out and isinstance(out["output_dir"], str):
        out["output_dir"] = out["output_dir"].removeprefix("./").rstrip("/")
    if "adapter" not in raw:
        out["adapter"] = "qlora" if raw.get("load_in_4bit") else None
        if out["adapter"] is None:
            notes.append(f"{where}.adapter: unset, which in an Axolotl config is a full fine-tune: "
                         "every weight is trained (set adapter: lora for LoRA)")
    return out, notes, problems.found


def _translate_keys(raw: dict[str, Any], out: dict[str, Any], notes: list[str], where: str) -> None:
    """The keys of TRANSLATED that are set, into ``out``."""
    problems = Problems()

    def note(key: str, text: str) -> None:
        notes.append(f"{where}.{key} = {raw[key]!r}: {text}")

    def refuse(key: str, text: str) -> None:
        problems.found.append(f"{where}.{key}: {raw[key]!r}: {text}")

    if raw.get("load_in_4bit") and raw.get("adapter") == "lora":
        out["adapter"] = "qlora"
        note("load_in_4bit", "adapter: lora over a 4-bit base is tunedag's adapter: qlora")
    if raw.get("load_in_8bit"):
        note("load_in_8bit", "tunedag has no 8-bit base: LoRA trains over the bf16 base (about twice the base's "
                             "memory of 8-bit; adapter: qlora takes half of it)")
    if raw.get("lora_target_linear"):
        listed = raw.get("lora_target_modules") or []
        if isinstance(listed, list) and listed:
            out["lora_target_modules"] = list(dict.fromkeys([*LINEAR_PROJECTIONS, *listed]))
        elif listed:
            refuse("lora_target_linear", "beside a lora_target_modules pattern; tunedag takes a list of module "
                                         "names")
        note("lora_target_linear", "lora_target_modules: every linear projection of the decoder "
                                   f"({', '.join(LINEAR_PROJECTIONS)}){' and those listed' if listed else ''}")
    if raw.get("unfrozen_parameters") and raw.get("adapter") in ("lora", "qlora"):
        out.pop("unfrozen_parameters", None)
        note("unfrozen_parameters", f"with adapter: {raw['adapter']} the base model is frozen already and only "
                                    "the adapters (and lora_modules_to_save) train; it applies to full fine-tunes")
    optimizer = raw.get("optimizer")
    if optimizer in OPTIMIZER_ALIASES:
        out["optimizer"] = OPTIMIZER_ALIASES[optimizer]
    if optimizer == "muon" and raw.get("adam_beta2") is None:  # Axolotl's Muon: AdamW betas (0.9, 0.95) unless set
        out["adam_beta2"] = 0.95
        note("optimizer", "muon: its AdamW part (embeddings, lm_head, norms, biases) takes adam_beta2: 0.95, "
                          "Axolotl's Muon default")
    model_config = raw.get("model_config")
    if isinstance(model_config, dict) and model_config:
        if set(model_config) == {"output_router_logits"}:
            note("model_config", "tunedag adds a mixture-of-experts model's router load-balancing loss as its "
                                 "config.json sets router_aux_loss_coef")
        else:
            refuse("model_config", "tunedag loads the base model as its config.json describes it; edit a copy "
                                   "of the model folder instead")
    checkpointing = raw.get("gradient_checkpointing")
    if checkpointing == "offload":
        out["gradient_checkpointing"] = True
        out["activation_offloading"] = True
    elif isinstance(checkpointing, str):
        refuse("gradient_checkpointing", "tunedag takes true, false or 'offload' (checkpointed layer inputs kept "
                                         "in CPU memory)")
    elif checkpointing is not None:
        out["gradient_checkpointing"] = checkpointing
    if not asks_nothing(raw.get("deepspeed")):
        out["train_engine"] = "deepspeed"
        out["deepspeed_config"] = raw["deepspeed"]
        stage = _zero_stage(raw["deepspeed"])
        if stage in (1, 2, 3):
            out["deepspeed_zero_stage"] = stage
        elif stage is not None:
            refuse("deepspeed", f"ZeRO stage {stage}: tunedag runs DeepSpeed at stage 1, 2 or 3")
    fsdp_keys = [k for k in ("fsdp", "fsdp_config", "fsdp_version") if not asks_nothing(raw.get(k))]
    if fsdp_keys:
        if "train_engine" in out and out["train_engine"] != "fsdp":
            refuse(fsdp_keys[0], f"set beside train_engine: {out['train_engine']}; choose one engine")
        out["train_engine"] = "fsdp"
        fsdp_config = raw.get("fsdp_config")
        if isinstance(fsdp_config, dict) and fsdp_config.get("offload_params"):
            refuse("fsdp_config", "offload_params is not offered on fsdp; use train_engine: deepspeed with "
                                  "deepspeed_zero_stage: 3 and deepspeed_offload: all")
        elif isinstance(fsdp_config, dict) and fsdp_config:
            note("fsdp_config", "tunedag's fsdp shards each decoder layer (FSDP2), computes in bf16 and reduces "
                                "in fp32; the settings here are not needed")
    if raw.get("reward_model"):
        if raw.get("rl") not in (None, "reward"):
            refuse("reward_model", f"set beside rl: {raw['rl']}; a run trains one objective")
        out["rl"] = "reward"
    if raw.get("process_reward_model"):
        if raw.get("rl") not in (None, "prm") or raw.get("reward_model"):
            refuse("process_reward_model", f"set beside {'reward_model' if raw.get('reward_model') else 'rl'}; "
                                           "a run trains one objective")
        out["rl"] = "prm"
    if raw.get("rl") == "ipo":
        out["rl"], out["dpo_loss_type"] = "dpo", "ipo"
    if raw.get("dpo_beta") is not None and "rl_beta" not in raw:
        out["rl_beta"] = raw["dpo_beta"]
    if raw.get("save_total_limit") is not None:
        out["keep_last_checkpoints"] = raw["save_total_limit"]
    if raw.get("use_wandb") is False:
        out["wandb_mode"] = "disabled"
    if raw.get("revision_of_model") is not None:
        out["base_model_revision"] = raw["revision_of_model"]
    if raw.get("evals_per_epoch") == 0:  # Axolotl reads 0 as unset: no evaluation from it
        out.pop("evals_per_epoch")
    for key in ("eval_strategy", "evaluation_strategy"):
        strategy = raw.get(key)
        if strategy == "epoch" and "evals_per_epoch" not in raw:
            out["evals_per_epoch"] = 1
        elif strategy == "no":
            out.pop("eval_steps", None)
            out.pop("evals_per_epoch", None)
        elif strategy not in (None, "steps", "epoch"):
            refuse(key, "tunedag evaluates every eval_steps steps or evals_per_epoch times an epoch")
    for key in ("bf16", "bfloat16"):
        if raw.get(key) is False and not raw.get("fp16"):
            note(key, "tunedag computes in bf16 on CUDA GPUs regardless (fp32 on CPU)")
    qat = raw.get("qat")
    if isinstance(qat, dict) and "quantize_embedding" in qat:
        if qat["quantize_embedding"]:
            refuse("qat", "quantize_embedding: true is not offered: tunedag fake-quantizes the linear layers "
                          "(lm_head included), not the embedding")
        out["qat"] = {k: v for k, v in qat.items() if k != "quantize_embedding"}
    if raw.get("val_set_size") in (0, 0.0):
        out.pop("val_set_size")
        note("val_set_size", "tunedag's evaluate stage scores held-out rows, so its default val_set_size 0.05 "
                             "holds out 5% of the rows")
    labels = 2 if raw.get("process_reward_model") else 1 if raw.get("reward_model") else None
    if raw.get("num_labels") not in (None, labels):
        refuse("num_labels", "tunedag trains causal language models, reward models (reward_model: true) with one "
                             "score and process reward models (process_reward_model: true) with two labels")
    if not asks_nothing(raw.get("model_quantization_config")) or not asks_nothing(
            raw.get("model_quantization_config_kwargs")):
        if raw.get("model_quantization_config") == "Mxfp4Config" and (
                raw.get("model_quantization_config_kwargs") or {}) == {"dequantize": True}:
            note("model_quantization_config", "tunedag loads an MXFP4 checkpoint's experts (gpt-oss) dequantized to "
                                              "bf16, as dequantize: true asks, and trains over them")
        else:
            refuse("model_quantization_config", "tunedag's quantized base is 4-bit NF4 (adapter: qlora); an MXFP4 "
                                                "checkpoint loads dequantized (Mxfp4Config with dequantize: true)")
    if raw.get("lr_scheduler") == "constant_with_warmup":
        out["lr_scheduler"] = "constant"
    if not asks_nothing(raw.get("llmcompressor")):
        with problems.check():
            out["keep_sparsity"] = kept_sparsity(raw["llmcompressor"], f"{where}.llmcompressor")
            if raw["llmcompressor"].get("save_compressed"):
                note("llmcompressor", "the zeros of the pruned weights are kept; tunedag saves the model as dense "
                                      "safetensors (llm-compressor's compressed format is not written)")
    plugins = raw.get("plugins") or []
    known = LIGER_PLUGINS + (("llm_compressor",) if "keep_sparsity" in out else ())
    foreign = [p for p in plugins if not any(name in str(p) for name in known)]
    if foreign:
        refuse("plugins", f"{', '.join(map(str, foreign))}: tunedag has no plugins")
    elif plugins:
        note("plugins", "tunedag's triton engine has its own fused kernels in place of Liger's and Cut Cross "
                        "Entropy's")
    problems.raise_if_any()


def kept_sparsity(settings: Any, where: str) -> list[str]:
    """keep_sparsity from Axolotl's llmcompressor settings: the targets of a recipe whose only modifier is
    ConstantPruningModifier (started at step 0). llm-compressor matches ``re:`` targets with ``re.match``."""
    recipe = settings.get("recipe") if isinstance(settings, dict) else None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{where}.recipe: expected the recipe written inline (stages of modifiers), got {recipe!r}")
    modifiers = {name: args for stage in recipe.values() if isinstance(stage, dict)
                 for group in stage.values() if isinstance(group, dict) for name, args in group.items()}
    others = sorted(set(modifiers) - {"ConstantPruningModifier"})
    if others or not modifiers:
        raise ConfigError(f"{where}.recipe: {', '.join(others) or 'no modifier'}: tunedag keeps a pruned model sparse "
                          "(ConstantPruningModifier) and offers no other llm-compressor modifier")
    args = modifiers["ConstantPruningModifier"] or {}
    targets = args.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    plain = [t for t in targets if not str(t).startswith("re:")]
    if plain or not targets or args.get("start", 0) not in (0, -1):
        raise ConfigError(f"{where}.recipe: ConstantPruningModifier {args!r}: tunedag takes 're:' targets (parameter "
                          "name patterns) from step 0")
    return [f"^(?:{t.removeprefix('re:')})" for t in targets]


def _zero_stage(path: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed JSON where it can be read now (the check names a missing file)."""
    try:
        stage = json.loads(Path(str(path)).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


def _translate_datasets(entries: Any, where: str, base_dir: Path, notes: list[str], rl: Any,
                        problems: Problems) -> Any:
    """Axolotl's dataset entries: a bare hub id is a hub dataset, ``name`` its subset and ``split`` its split;
    refused keys are left out and reported in ``problems``."""
    if not isinstance(entries, list):
        return entries
    return [_translate_dataset(entry, f"{where}[{i}]", base_dir, notes, rl, problems)
            for i, entry in enumerate(entries)]


# Axolotl's KTO row types (chatml.* / llama3.* under rl: kto): the prompt column of each
KTO_PROMPT_FIELDS = {"argilla": "instruction", "intel": "question", "prompt_pairs": "prompt", "ultra": "prompt"}


def _translate_dataset(entry: Any, where: str, base_dir: Path, notes: list[str], rl: Any,
                       problems: Problems) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return entry
    problems.found += [f"{where}.{key}: Axolotl's {key} = {value!r} is not offered: {DATASET_REFUSED_KEYS[key]}; "
                       "remove the key" for key, value in entry.items()
                       if key in DATASET_REFUSED_KEYS and not asks_nothing(value)]
    entry = {k: v for k, v in entry.items() if v is not None and k not in DATASET_REFUSED_KEYS}
    path = entry["path"]
    hub = path.startswith("hf:") or (HUB_DATASET.fullmatch(path) is not None and not path.endswith(DATA_SUFFIXES)
                                     and not (base_dir / path).exists())
    subset, split = entry.pop("name", None), entry.pop("split", None)
    entry.pop("ds_type", None)
    if hub:
        source = path.removeprefix("hf:")
        if subset and ":" not in source:
            source += f":{subset}"
        if split and "@" not in source:
            source += f"@{split}"
        entry["path"] = "hf:" + source
    else:
        if subset:
            notes.append(f"{where}.name = {subset!r}: a subset name applies to hub datasets; {path!r} is a file")
        if split not in (None, "train"):
            problems.found.append(f"{where}.split: {split!r}: a local file {path!r} is read whole; split it into "
                                  "its own file")
    thinking = entry.pop("field_thinking", None), entry.pop("template_thinking_key", None)
    if any(thinking):  # Axolotl maps the template's thinking key to the message field holding the reasoning
        field, key = thinking[0] or "reasoning_content", thinking[1] or "reasoning_content"
        mappings = dict(entry.get("message_property_mappings") or {})
        if field != key and mappings.setdefault(key, field) != field:
            problems.found.append(f"{where}.field_thinking: {field!r} beside message_property_mappings "
                                  f"{key}: {mappings[key]!r}; set one")
        entry["message_property_mappings"] = mappings or None
    if "train_on_eot" in entry:
        eot = entry.pop("train_on_eot")
        if entry.setdefault("train_on_eos", eot) != eot:
            problems.found.append(f"{where}.train_on_eot: {eot!r} beside train_on_eos {entry['train_on_eos']!r}: "
                                  "tunedag's end-of-turn tokens are one setting, train_on_eos; set one")
    template = entry.get("chat_template_jinja")
    if isinstance(template, str) and "{" not in template:
        with problems.check():
            entry["chat_template_jinja"] = read_template(template, f"{where}.chat_template_jinja", base_dir)
    family, _, kind = str(entry.get("type", "")).partition(".")
    if rl == "kto" and family in ("chatml", "llama3") and kind in KTO_PROMPT_FIELDS:
        entry.update(type="kto", field_prompt=KTO_PROMPT_FIELDS[kind], field_completion="completion",
                     field_label="label", chat_template=family)
    return entry


def read_template(path: str, where: str, base_dir: Path) -> str:
    """A chat template named by its file (Axolotl takes a path or the text): the file's text."""
    try:
        return (base_dir / path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: {path!r} is neither a Jinja template nor a readable template file "
                          f"({err.__class__.__name__})") from None
