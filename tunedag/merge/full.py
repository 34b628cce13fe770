"""The merge stage of a full fine-tune (``adapter: null``): the trained model into a plain HF folder.

The train stage writes the whole trained model (fp32 master weights, in whatever shards the
engine wrote). There is nothing to fold in; this stage gives it the same form as a merged LoRA
model, so that evaluate and the GGUF and vLLM exports read both alike: weights cast to
``merge_dtype`` (auto: the base model's) and written tensor by tensor as ``max_shard_size``
shards with an index, with the base model's config, tokenizer, chat template and
generation_config. Every tensor must be one of the base model's, of the same shape (a trained
folder of another model stops here), except that the embeddings and LM head have grown by the
tokens the run adds (special_tokens, tokens); a model small enough to load twice is checked end
to end: the written folder's logits against the trained model's.

A reward model (``rl: reward``) is the base as ``<Arch>ForSequenceClassification``: its tensors are
checked against that layout (no ``lm_head``, a one-row ``score``), every one of them must be written,
config.json names the class, one label and the pad token as a merged reward adapter's does, and the
end-to-end check compares scores. A process reward model (``rl: prm``) is the same with
``<Arch>ForTokenClassification`` and two labels (tunedag.models.classifiers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tunedag.config import RunConfig
from tunedag.io import atomic_path
from tunedag.merge.adapter import (LOGIT_CHECK_MAX_BYTES, MAX_RELATIVE_LOGIT_ERROR, copy_model_files, target_dtype,
                                   weight_bytes)
from tunedag.merge.weights import MergeError, ShardWriter, base_tensors, grown_shape, parse_size
from tunedag.models.loading import check_weight_files, load_run_tokenizer, run_vocab_size
from tunedag.models.classifiers import BY_RL


def tensor_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a model folder's safetensors files (headers only)."""
    shapes = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


@torch.no_grad()
def _logit_error(run: RunConfig, trained_dir: Path, out_dir: Path) -> float:
    """Relative error of the written model's logits (a reward model's scores) against the trained model's."""
    auto = BY_RL[run.rl].auto if run.rl in BY_RL else AutoModelForCausalLM
    ids = torch.randint(0, json.loads((trained_dir / "config.json").read_text())["vocab_size"], (8, 32),
                        generator=torch.Generator().manual_seed(run.seed))
    logits = []
    for folder in (trained_dir, out_dir):
        model = auto.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                     trust_remote_code=run.trust_remote_code).eval()
        logits.append(model(input_ids=ids).logits.float())
        del model
    ref, written = logits
    return float((written - ref).norm() / ref.norm())


def merge_full_model(run: RunConfig, model_path: Path, trained_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``: the full fine-tune in ``trained_dir`` as the merged model folder."""
    if not (trained_dir / "config.json").is_file():
        what = "a LoRA adapter" if (trained_dir / "adapter_config.json").is_file() else "no model"
        raise MergeError(f"{trained_dir}: {what}, where adapter: null needs the trained model (config.json and "
                         "safetensors); run the train stage again (snakemake --forcerun train)")
    check_weight_files(trained_dir)
    check_weight_files(model_path)
    dtype = target_dtype(run, model_path)
    classifier = BY_RL.get(run.rl)
    architecture, expected = classifier.shapes(model_path, run.trust_remote_code) if classifier else (None, None)
    base = expected if expected is not None else tensor_shapes(model_path)
    tokenizer = load_run_tokenizer(model_path, run)
    vocab = run_vocab_size(model_path, run, tokenizer)  # the embeddings grew to the run's tokenizer
    base = {name: grown_shape(shape, model_path, vocab) for name, shape in base.items()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        writer, total, names = ShardWriter(tmp, parse_size(run.max_shard_size)), 0, []
        for name, tensor in base_tensors(trained_dir):
            if name not in base or base[name] != tuple(tensor.shape):
                found = f"of shape {base[name]}" if name in base else "none"
                raise MergeError(f"{trained_dir}: {name} {tuple(tensor.shape)} has no counterpart in {model_path} "
                                 f"{'as a reward model ' if architecture else ''}({found}): not a fine-tune of "
                                 "this base model")
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
            writer.add(name, tensor)
            total += tensor.numel() * tensor.element_size()
            names.append(name)
        unwritten = set(expected or ()) - set(names)
        if unwritten:
            raise MergeError(f"{trained_dir}: no tensor for {', '.join(sorted(unwritten)[:3])} of the reward "
                             "model; run the train stage again (snakemake --forcerun train)")
        writer.close(total)
        copy_model_files(run, model_path, tmp, dtype, tokenizer, architecture,
                         classifier.num_labels if classifier else 1)
        report: dict[str, Any] = {"full_fine_tune": True, "written_tensors": len(names),
                                  "relative_logit_error": None}
        if weight_bytes(trained_dir) <= LOGIT_CHECK_MAX_BYTES:
            error = _logit_error(run, trained_dir, tmp)
            if error > MAX_RELATIVE_LOGIT_ERROR[dtype]:
                raise MergeError(f"the written model's logits differ from the trained model's in {trained_dir} by "
                                 f"{error:.2e} (relative; limit {MAX_RELATIVE_LOGIT_ERROR[dtype]:.0e})")
            report["relative_logit_error"] = error
        report.update(dtype=str(dtype).removeprefix("torch."), base_model=run.base_model, trained=str(trained_dir),
                      config_hash=run.stage_hash("merge"))
        (tmp / "tunedag_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
