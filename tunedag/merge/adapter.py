"""The merge stage: fold the LoRA adapter into the base weights and save a plain HF folder.

Weights are merged tensor by tensor from the safetensors files (tunedag.merge.weights: fp32
merge, then the cast to ``merge_dtype``; never the whole model in memory), written as sharded
safetensors with an index; config, tokenizer, chat template and generation_config come along.
The tokenizer is the run's (tunedag.data.run_tokenizer); when it added tokens, the base's embeddings
and LM head grow as training grew them (untrained rows rebuilt as their mean start, trained ones from
lora_modules_to_save), config.json's vocab_size follows, and the run's special tokens become the
config's and generation_config's ids (generation stops at the run's EOS and the base's).
Every merged tensor is checked against the unmerged adapter on random inputs; a model small
enough to load twice is also checked end to end: the merged model's logits against base +
adapter through PEFT. Either check failing fails the stage, and nothing is renamed into place.

A reward model's adapter (``rl: reward``, peft task SEQ_CLS) is merged into
``<Arch>ForSequenceClassification``, a process reward model's (``rl: prm``, TOKEN_CLS) into
``<Arch>ForTokenClassification`` (tunedag.models.classifiers): the base's ``lm_head`` is left out, the
adapter's trained ``score`` head is added, and config.json names the class, its labels and the pad
token (no generation_config: it generates nothing). Its end-to-end check compares scores.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tunedag.config import RunConfig
from tunedag.io import atomic_path
from tunedag.merge.weights import MergeError, merge_weights, parse_size
from tunedag.models.loading import check_weight_files, load_causal_lm, load_run_tokenizer, run_vocab_size
from tunedag.models.classifiers import BY_TASK, Classifier
from tunedag.models.mxfp4 import is_mxfp4
from tunedag.models.reward_head import reward_pad_token_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Above this many base-weight bytes the end-to-end logit check (two models in memory) is skipped;
# the per-tensor checks still run.
LOGIT_CHECK_MAX_BYTES = 2 << 30
# fp32 merge vs base + adapter through PEFT: summation order differs, ~1e-6 relative here; a
# wrong merge (missing scale, wrong layer) is above 1e-2. bf16/fp16 outputs add their rounding.
MAX_RELATIVE_LOGIT_ERROR = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

__all__ = ["MergeError", "merge_adapter"]


def target_dtype(run: RunConfig, model_path: Path) -> torch.dtype:
    if run.merge_dtype != "auto":
        return DTYPES[run.merge_dtype]
    config = json.loads((model_path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def weight_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in model_path.glob("*.safetensors"))


def adapter_classifier(adapter_dir: Path) -> Classifier | None:
    """The head the adapter was trained with (``rl: reward`` or ``prm``: peft's SEQ_CLS or TOKEN_CLS task),
    or None for a causal LM's adapter."""
    config_path = adapter_dir / "adapter_config.json"
    return BY_TASK.get(json.loads(config_path.read_text()).get("task_type")) if config_path.is_file() else None


def classifier_config(config: dict[str, Any], architecture: str, pad_token_id: int, num_labels: int) -> dict[str, Any]:
    """The base's config.json as a classifier's (what transformers' Auto classes and vLLM read): the class,
    its labels and the pad token a sequence classifier's pooling skips."""
    return {**config, "architectures": [architecture], "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(num_labels)}, "pad_token_id": pad_token_id}


def run_token_ids(run: RunConfig, tokenizer: Any) -> dict[str, int]:
    """{bos,eos,pad,unk}_token_id of the roles the run's special_tokens set, as ``tokenizer`` (the run's) has them."""
    special = run.special_tokens
    roles = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {f"{role}_id": tokenizer.convert_tokens_to_ids(getattr(special, role)) for role in roles
            if special is not None and getattr(special, role) is not None}


def copy_model_files(run: RunConfig, model_path: Path, out: Path, dtype: torch.dtype, tokenizer: Any,
                      reward_architecture: str | None, num_labels: int = 1) -> None:
    """config.json (dtype, vocabulary and the run's special-token ids; a classifier's labels), the run's
    ``tokenizer``, generation_config.json and any model code, beside the merged weights in ``out``."""
    config = json.loads((model_path / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if is_mxfp4(config):  # the merge wrote the MXFP4 experts dequantized (tunedag.models.mxfp4)
        del config["quantization_config"]
    if "dtype" in config:
        config["dtype"] = name
    token_ids = run_token_ids(run, tokenizer)
    config.update(vocab_size=max(config.get("vocab_size", 0), len(tokenizer)), **token_ids)
    if reward_architecture:
        pad = reward_pad_token_id(AutoConfig.from_pretrained(model_path, trust_remote_code=run.trust_remote_code),
                                  tokenizer)
        config = classifier_config(config, reward_architecture, pad, num_labels)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    sentencepiece = model_path / "tokenizer.model"  # transformers 5 saves tokenizer.json only; GGUF export reads it
    if sentencepiece.is_file() and not (out / sentencepiece.name).exists():
        shutil.copy2(sentencepiece, out / sentencepiece.name)
    if (model_path / "generation_config.json").is_file() and not reward_architecture:  # a reward model generates nothing
        generation = GenerationConfig.from_pretrained(model_path)
        for key, value in token_ids.items():  # the run's eos stops generation, the base's too
            old = getattr(generation, key)
            old = old if isinstance(old, list) else [] if old is None else [old]
            setattr(generation, key, list(dict.fromkeys([value, *old])) if key == "eos_token_id" else value)
        generation.save_pretrained(out)
    if run.trust_remote_code:  # the model's own code travels with it
        for code in model_path.glob("*.py"):
            shutil.copy2(code, out / code.name)


@torch.no_grad()
def _logit_error(run: RunConfig, model_path: Path, adapter_dir: Path, merged_dir: Path,
                 classifier: Classifier | None, vocab_size: int | None) -> float:
    """Relative error of the merged model's logits (a reward model's scores) against base + adapter
    through PEFT."""
    if classifier:  # the head's seeded start is replaced by the adapter's trained score
        base = classifier.load(model_path, torch.float32, run.trust_remote_code, run.seed)
    else:
        base = load_causal_lm(model_path, torch.float32, run.trust_remote_code, vocab_size=vocab_size)
    if run.adapter == "qlora":
        from tunedag.models.qlora import fake_quantize_

        fake_quantize_(base)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.randint(0, base.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(run.seed))
    ref = adapted(input_ids=ids).logits.float()
    del adapted, base
    auto = classifier.auto if classifier else AutoModelForCausalLM
    merged = auto.from_pretrained(merged_dir, use_safetensors=True, trust_remote_code=run.trust_remote_code).eval()
    return float((merged(input_ids=ids).logits.float() - ref).norm() / ref.norm())


def merge_adapter(run: RunConfig, model_path: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``: the base model with the adapter merged in."""
    check_weight_files(model_path)
    dtype = target_dtype(run, model_path)
    classifier = adapter_classifier(adapter_dir)
    architecture, shapes = classifier.shapes(model_path, run.trust_remote_code) if classifier else (None, None)
    target_names = set(shapes) if shapes else None
    tokenizer = load_run_tokenizer(model_path, run)  # once: the vocabulary's size and the merged folder's copy
    vocab = run_vocab_size(model_path, run, tokenizer)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        report: dict[str, Any] = merge_weights(model_path, adapter_dir, tmp, dtype, parse_size(run.max_shard_size),
                                               nf4_base=run.adapter == "qlora", seed=run.seed,
                                               target_names=target_names, vocab_size=vocab)
        copy_model_files(run, model_path, tmp, dtype, tokenizer, architecture,
                         classifier.num_labels if classifier else 1)
        report["relative_logit_error"] = None
        if weight_bytes(model_path) <= LOGIT_CHECK_MAX_BYTES:
            error = _logit_error(run, model_path, adapter_dir, tmp, classifier, vocab)
            if error > MAX_RELATIVE_LOGIT_ERROR[dtype]:
                raise MergeError(f"merged model's logits differ from base + adapter by {error:.2e} (relative; "
                                 f"limit {MAX_RELATIVE_LOGIT_ERROR[dtype]:.0e}): {adapter_dir} does not match "
                                 f"{model_path}")
            report["relative_logit_error"] = error
        report.update(dtype=str(dtype).removeprefix("torch."), base_model=run.base_model,
                      adapter=str(adapter_dir), config_hash=run.stage_hash("merge"))
        (tmp / "tunedag_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
