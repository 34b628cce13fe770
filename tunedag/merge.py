"""The merge stage: fold the LoRA adapter into the base weights and save a plain HF folder.

The merge happens in fp32 and is cast to ``merge_dtype`` afterwards; the folder gets sharded
safetensors, the tokenizer, chat template and generation_config. Before the folder is renamed
into place, the merged model's logits are compared with base + adapter on sample inputs, and
the stage fails if they diverge.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import GenerationConfig

from tunedag.config import RunConfig
from tunedag.errors import TunedagError
from tunedag.io import atomic_path
from tunedag.models.loading import load_causal_lm, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp32 merge: W + s·BA rounds differently from computing W·x + s·B(A·x); at these magnitudes
# the difference stays near 1e-5 relative. A wrong merge (missing scale, wrong layer) is >1e-1.
MAX_RELATIVE_LOGIT_ERROR = 1e-3


class MergeError(TunedagError, RuntimeError):
    """The merged model does not reproduce base + adapter."""


def _target_dtype(run: RunConfig, model_path: Path) -> torch.dtype:
    if run.merge_dtype != "auto":
        return DTYPES[run.merge_dtype]
    config = json.loads((model_path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def merge_adapter(run: RunConfig, model_path: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``: the base model with the adapter merged in."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (run the train stage)")
    base = load_causal_lm(model_path, torch.float32, run.trust_remote_code)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    vocab_size = base.config.vocab_size
    # the reference logits must come from the unmerged model, before merge_and_unload folds it
    generator = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(0, vocab_size, (2, 32), generator=generator)
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits.float()
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        error = float((merged(input_ids=ids).logits.float() - ref).norm() / ref.norm())
    if error > MAX_RELATIVE_LOGIT_ERROR:
        raise MergeError(f"merged model's logits differ from base + adapter by {error:.2e} "
                         f"(relative; limit {MAX_RELATIVE_LOGIT_ERROR:.0e}): {adapter_dir} does not "
                         f"match {model_path}")
    dtype = _target_dtype(run, model_path)
    merged = merged.to(dtype)
    tokenizer = load_tokenizer(model_path, run.trust_remote_code)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=run.max_shard_size)
        tokenizer.save_pretrained(tmp)
        if (model_path / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(model_path).save_pretrained(tmp)
        report = {"relative_logit_error": error, "dtype": str(dtype).removeprefix("torch."),
                  "base_model": run.base_model, "adapter": str(adapter_dir),
                  "config_hash": run.stage_hash("merge")}
        (tmp / "tunedag_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
