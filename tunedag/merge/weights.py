"""LoRA merged into base weights one tensor at a time, straight from the safetensors files.

Memory stays about one base tensor plus its adapter: the base model is never loaded whole, and
the merged model is written shard by shard as it is produced. Each merged weight is
W' = W + s·B·A in fp32 (s = alpha / r, or alpha / sqrt(r) for rsLoRA); with DoRA,
W' = m / ‖W + s·B·A‖_row · (W + s·B·A). A QLoRA adapter was trained against the NF4-rounded base,
so its base weights are quantised and dequantised the same way before the merge. Every merged
weight is checked on random inputs against the unmerged computation x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tunedag.errors import TunedagError
from tunedag.kernels.nf4 import dequantize_nf4_reference
from tunedag.model_facts import read_model_config
from tunedag.models.moe import expert_loras
from tunedag.models.mxfp4 import dequantized_tensors, is_mxfp4
from tunedag.models.qlora import quantize_weight
from tunedag.models.vocab import grow_rows
from tunedag.models.registry import QUANTIZED_PROJECTIONS

PREFIX = "base_model.model."
# fp32 merge vs the unmerged product, relative: rounding of the sum stays near 1e-6; a wrong
# scale, transpose or layer shows at 1e-2 and above
MAX_RELATIVE_ERROR = 1e-4


class MergeError(TunedagError, RuntimeError):
    """The adapter cannot be merged into this base, or the merge does not reproduce it."""


@dataclass
class LoraTensors:
    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None  # DoRA


def parse_size(text: str) -> int:
    """'2GB' → 2·10⁹, '500MiB' → 500·2²⁰ (the units max_shard_size takes in transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", text, re.I)
    if not match:
        raise MergeError(f"max_shard_size {text!r}: expected a size such as 2GB or 500MiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "KMG".index(unit[0]) * base)


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, LoraTensors], dict[str, torch.Tensor]]:
    """(adapter config, LoRA tensors by base weight name, full replacements by base weight name)."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (run the train stage)")
    config = json.loads(config_path.read_text())
    if config.get("alpha_pattern"):
        raise MergeError(f"{config_path}: per-module alpha_pattern is not supported by the merge")
    if config.get("bias", "none") != "none":
        raise MergeError(f"{config_path}: bias={config['bias']!r} adapters are not supported by the merge")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as fh:
        for key in fh.keys():
            name = key.removeprefix(PREFIX)
            match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", name)
            if match:
                parts.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = fh.get_tensor(key)
            else:  # modules_to_save: a full copy of the module's tensor
                replaced[name] = fh.get_tensor(key)
    lora = {}
    for weight, p in parts.items():
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            raise MergeError(f"{adapter_dir}: {weight} has only {sorted(p)} of lora_A/lora_B")
        lora[weight] = LoraTensors(p["lora_A.weight"], p["lora_B.weight"], p.get("lora_magnitude_vector"))
    return config, lora, replaced


def split_expert_loras(lora: dict[str, LoraTensors], model_path: Path) -> dict[str, LoraTensors]:
    """MoE (Mixtral, Qwen3-MoE): each LoRA on a 3-D expert parameter becomes one LoRA per expert weight
    of the base's checkpoint (see tunedag.models.moe.expert_loras); other entries pass unchanged."""
    config_path = model_path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    out = {}
    for name, parts in lora.items():
        try:
            experts = expert_loras(name, parts.a, parts.b, config)
        except ValueError as err:
            raise MergeError(str(err)) from None
        if experts is None:
            out[name] = parts
        elif parts.magnitude is not None:
            raise MergeError(f"{name}: DoRA on expert parameters is not supported by the merge")
        else:
            out.update({n: LoraTensors(a, b, None) for n, (a, b) in experts.items()})
    return out


def lora_scale(config: dict, rank: int) -> float:
    alpha = config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def merge_tensor(weight: torch.Tensor, lora: LoraTensors, scale: float) -> torch.Tensor:
    """The merged weight in fp32 (weight is (out, in); A is (r, in), B is (out, r); or all three stacked per expert)."""
    merged = weight.float() + scale * (lora.b.float() @ lora.a.float())
    if lora.magnitude is not None:
        merged = (lora.magnitude.float() / torch.linalg.norm(merged, dim=1))[:, None] * merged
    return merged


def check_tensor(name: str, weight: torch.Tensor, merged: torch.Tensor, lora: LoraTensors, scale: float,
                 generator: torch.Generator) -> float:
    """Relative error of x·W'ᵀ against the unmerged adapter computation on random inputs (per expert for a
    stacked 3-D expert weight)."""
    x = torch.randn(*weight.shape[:-2], 8, weight.shape[-1], generator=generator)
    ref = x @ weight.float().mT + scale * (x @ lora.a.float().mT) @ lora.b.float().mT
    if lora.magnitude is not None:
        norm = torch.linalg.norm(weight.float() + scale * lora.b.float() @ lora.a.float(), dim=1)
        ref = ref * (lora.magnitude.float() / norm)
    error = float((x @ merged.mT - ref).norm() / ref.norm().clamp_min(1e-30))
    if error > MAX_RELATIVE_ERROR:
        raise MergeError(f"merged {name} differs from base + adapter by {error:.2e} (relative; limit "
                         f"{MAX_RELATIVE_ERROR:.0e})")
    return error


def base_tensors(model_path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every base weight, one at a time, in file order."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_path.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{model_path}: no .safetensors weights")
    for file in files:
        with safe_open(model_path / file, framework="pt") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


class ShardWriter:
    """Write tensors into model-NNNNN-of-MMMMM.safetensors files of at most ``max_bytes`` each."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map = 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.weight_map.update({name: path.name for name in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self, total_bytes: int) -> None:
        """Give shards their final names (model.safetensors when there is one) and write the index."""
        if self.pending:
            self._flush()
        if len(self.files) == 1:
            self.files[0].rename(self.out_dir / "model.safetensors")
            return
        names = {p.name: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, p in enumerate(self.files)}
        for path in self.files:
            path.rename(self.out_dir / names[path.name])
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def is_nf4_weight(name: str) -> bool:
    """Whether QLoRA training held this base weight in NF4 (the decoder layers' projections)."""
    module, _, leaf = name.rpartition(".")
    return (leaf == "weight" and ".layers." in f".{module}" and module.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS
            and ".experts." not in module)  # MoE experts are 3-D parameters, never NF4


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight QLoRA training saw: quantised to NF4 as the engines do, dequantised."""
    return dequantize_nf4_reference(quantize_weight(weight), torch.float32).to(weight.dtype)


def grown_shape(shape: tuple[int, ...], model_path: Path, vocab_size: int | None) -> tuple[int, ...]:
    """``shape`` of a base tensor once the embeddings grow to ``vocab_size`` rows (tokens the run adds):
    a matrix with one row per token of config.json's vocab_size (input embeddings, LM head) gets
    ``vocab_size`` rows; every other shape stays."""
    if vocab_size is None or len(shape) != 2:
        return shape
    return (vocab_size, shape[1]) if _base_vocab_rows(model_path) == shape[0] < vocab_size else shape


@functools.lru_cache(maxsize=8)
def _base_vocab_rows(model_path: Path) -> int | None:
    """config.json's vocab_size (a multimodal config's text_config's), read once per model folder."""
    config = json.loads((model_path / "config.json").read_text())
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def merge_weights(model_path: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype,
                  max_shard_bytes: int, nf4_base: bool, seed: int = 0,
                  target_names: set[str] | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """Write the merged weights into ``out_dir``; return the worst per-tensor check error.

    ``vocab_size``: the rows of the run's tokenizer (tokens it adds); the base's embeddings and LM head
    grow to it as training grew them (tunedag.models.vocab.grow_rows), unless the adapter holds them
    trained in full (lora_modules_to_save).

    ``target_names``: the weights of the model being written when it is not the base's own
    architecture (a reward model: the decoder and the adapter's ``score``, no ``lm_head``). Base
    weights outside it are left out, adapter tensors the base lacks are added, and every name in
    it must end up written.
    """
    config, lora, replaced = read_adapter(adapter_dir)
    lora = split_expert_loras(lora, model_path)
    tensors = base_tensors(model_path)
    if is_mxfp4(read_model_config(model_path)):  # gpt-oss's experts, merged and written dequantized
        tensors = dequantized_tensors(tensors)
    generator = torch.Generator().manual_seed(seed)
    writer, worst, seen, dropped, written = ShardWriter(out_dir, max_shard_bytes), 0.0, set(), [], {}
    added_rows = 0

    def write(name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        writer.add(name, tensor)
        written[name] = tensor.numel() * tensor.element_size()

    for name, tensor in tensors:
        seen.add(name)
        if target_names is not None and name not in target_names:
            dropped.append(name)
            continue
        if nf4_base and is_nf4_weight(name):
            tensor = nf4_round_trip(tensor)
        shape = grown_shape(tuple(tensor.shape), model_path, vocab_size)
        if shape != tuple(tensor.shape):
            added_rows = shape[0] - tensor.shape[0]
            tensor = grow_rows(tensor, shape[0])
        if name in lora:
            parts = lora[name]
            scale = lora_scale(config, parts.a.shape[-2])
            merged = merge_tensor(tensor, parts, scale)
            worst = max(worst, check_tensor(name, tensor, merged, parts, scale, generator))
            tensor = merged
        elif name in replaced:
            tensor = replaced[name]
        write(name, tensor)
    added = sorted((set(replaced) - seen) & (target_names or set()))  # a new head, trained in full
    for name in added:
        write(name, replaced[name])
    missing = (set(lora) | set(replaced)) - seen - set(added)
    if missing:
        raise MergeError(f"{adapter_dir}: adapter tensors for weights the base at {model_path} does not have: "
                         f"{sorted(missing)[:5]}")
    unwritten = (target_names or set()) - set(written)
    if unwritten:
        raise MergeError(f"{adapter_dir} + {model_path}: no tensor for {sorted(unwritten)[:5]} of the merged model")
    writer.close(sum(written.values()))
    return {"max_relative_tensor_error": worst, "merged_tensors": len(lora), "replaced_tensors": len(replaced),
            "added_tensors": added, "dropped_tensors": dropped, "added_vocab_rows": added_rows}
