"""The export_vllm stage: folders that ``vllm serve`` accepts.

``model/`` is the merged HF folder (config.json with ``architectures``, safetensors, tokenizer,
generation_config); ``adapter/`` is the PEFT adapter for vLLM's LoRA serving
(adapter_config.json + adapter_model.safetensors). Both are checked before the folder is renamed
into place, and ``serve.json`` records the command lines that serve them. The chat template the
run trained with (when the caller passes it) replaces the folder's: ``chat_template.jinja``, which
transformers and so vLLM read first, and tokenizer_config.json's ``chat_template`` where it has one. A reward model
(``rl: reward``) is a ``*ForSequenceClassification`` folder that vLLM serves as a pooling model;
its adapter is copied too, but only the merged folder is served; so is a mixture of experts' adapter
with LoRA on the expert weights, which vLLM's fused-MoE LoRA has not been checked to load. A process reward model (``rl: prm``,
``*ForTokenClassification``) is not exported: vLLM would serve it only as a pooling model through its
token-classification task, and tunedag has not checked that vLLM loads that head (with its bias) and
returns the logits transformers does; serve the merged folder with transformers instead.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunedag.errors import TunedagError
from tunedag.io import atomic_path
# config validation refuses a rank or target vLLM cannot serve before training; these are its lists
from tunedag.model_facts import VLLM_LORA_MODULES, VLLM_LORA_RANKS

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
               "model.safetensors.index.json")


class VLLMExportError(TunedagError, ValueError):
    """A folder vLLM would refuse: names the file or setting."""


def check_model_dir(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise VLLMExportError(f"{path}: no config.json")
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):
        raise VLLMExportError(f"{config_path}: no 'architectures' entry; vLLM picks the model class from it")
    if not list(path.glob("*.safetensors")):
        raise VLLMExportError(f"{path}: no .safetensors weights")
    if not (path / "tokenizer_config.json").is_file():
        raise VLLMExportError(f"{path}: no tokenizer_config.json")
    if any(a.endswith("ForTokenClassification") for a in config["architectures"]):
        raise VLLMExportError(f"{config_path}: {config['architectures'][0]} (a process reward model, rl: prm) is "
                              "not exported for vLLM: tunedag has not checked that vLLM's token-classification "
                              "pooling gives the step logits transformers gives; serve the merged folder with "
                              "transformers (AutoModelForTokenClassification)")
    if is_reward_model(config):
        if len(config.get("id2label") or {}) != 1:
            raise VLLMExportError(f"{config_path}: a reward model has one label (a scalar score), "
                                  f"got id2label {config.get('id2label')!r}")
        if config.get("pad_token_id") is None:
            raise VLLMExportError(f"{config_path}: a reward model needs pad_token_id (its pooling skips padding)")
    return config


def is_reward_model(config: dict[str, Any]) -> bool:
    """A sequence classifier (``rl: reward``) rather than a causal LM."""
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def check_adapter_dir(path: Path) -> dict[str, Any]:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise VLLMExportError(f"{path}: no adapter_config.json")
    if not (path / "adapter_model.safetensors").is_file():
        raise VLLMExportError(f"{path}: no adapter_model.safetensors")
    config = json.loads(config_path.read_text())
    if config.get("r") not in VLLM_LORA_RANKS:
        raise VLLMExportError(f"{config_path}: LoRA rank {config.get('r')} is not one vLLM serves "
                              f"({', '.join(map(str, VLLM_LORA_RANKS))})")
    targets = set(config.get("target_modules") or [])
    unsupported = targets - VLLM_LORA_MODULES
    if unsupported:
        raise VLLMExportError(f"{config_path}: vLLM's LoRA layers do not cover {sorted(unsupported)}")
    if config.get("use_dora"):
        raise VLLMExportError(f"{config_path}: vLLM does not serve DoRA adapters; serve the merged model")
    return config


def _copy_files(src: Path, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True)
    for name in names:
        shutil.copy2(src / name, dest / name)


def _write_chat_template(model_dir: Path, template: str) -> None:
    (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "chat_template" in config:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_vllm(merged_dir: Path, adapter_dir: Path, out_dir: Path, chat_template: str | None = None) -> dict[str, Any]:
    """Write ``out_dir``/model, ``out_dir``/adapter and ``out_dir``/serve.json (``chat_template``: the run's).
    A full fine-tune (``adapter: null``: ``adapter_dir`` holds the trained model, config.json and no
    adapter_config.json) has no adapter to serve: only the model is written."""
    model_config = check_model_dir(merged_dir)
    full = (adapter_dir / "config.json").is_file() and not (adapter_dir / "adapter_config.json").is_file()
    adapter_config = None if full else check_adapter_dir(adapter_dir)
    model_files = sorted({p.name for p in merged_dir.glob("*.safetensors")}
                         | {n for n in MODEL_FILES if (merged_dir / n).is_file()})
    serve = {
        "architectures": model_config["architectures"],
        "merged": "vllm serve model --served-model-name tunedag",
        "lora": (f"vllm serve <base model> --enable-lora --max-lora-rank {adapter_config['r']} "
                 "--lora-modules tunedag=adapter") if adapter_config else None,
    }
    merge_report = merged_dir / "tunedag_merge.json"
    if adapter_config and merge_report.is_file() and json.loads(merge_report.read_text()).get("added_vocab_rows"):
        serve.update(lora=None, lora_note="the run added tokens (special_tokens, tokens), whose embedding rows the "
                                          "base model lacks: serve the merged model")
    if adapter_config and adapter_config.get("target_parameters"):
        serve.update(lora=None, lora_note="the adapter holds LoRA on expert weights (peft target_parameters: "
                                          f"{', '.join(adapter_config['target_parameters'])}); tunedag has not "
                                          "checked that vLLM's fused-MoE LoRA loads that layout and computes what "
                                          "peft does: serve the merged model")
    if is_reward_model(model_config):  # a pooling model; its score head is in the adapter in full, not as LoRA
        serve.update(merged="vllm serve model --runner pooling --served-model-name tunedag",
                     lora=None, lora_note="the adapter holds the score head trained in full, which vLLM's LoRA "
                                          "serving does not load: serve the merged model")
    with atomic_path(out_dir) as tmp:
        _copy_files(merged_dir, tmp / "model", model_files)
        if chat_template is not None:
            _write_chat_template(tmp / "model", chat_template)
        if adapter_config:
            _copy_files(adapter_dir, tmp / "adapter", ["adapter_config.json", "adapter_model.safetensors"])
        (tmp / "serve.json").write_text(json.dumps(serve, indent=2) + "\n")
    return serve
