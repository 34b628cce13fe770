"""HF safetensors weights -> GGUF tensors: names, layout, storage type.

Two passes keep memory bounded by one tensor: `plan_tensors` reads only headers
(names, shapes) so the GGUF tensor table can be written first; `load_tensor` then
reads one tensor lazily with `safe_open`, transforms it and quantises it.

MoE checkpoints keep every expert's projection as its own 2-D weight; llama.cpp wants one
(experts, out, in) tensor per projection and layer (``ffn_{gate,up,down}_exps``): those are
planned from the per-expert headers and stacked when written. gpt-oss checkpoints hold them
stacked already, as (experts, in, out) with gate and up interleaved by column in ``gate_up_proj``:
those are transposed, and gate_up split into its even (gate) and odd (up) rows, biases alike.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from tunedag.export.gguf_arch import ArchSpec, HParams, llama3_rope_factors, longrope_factors
from tunedag.export.gguf_errors import GGUFExportError

QT = gguf.GGMLQuantizationType
OUTTYPE_QTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Buffers some checkpoints carry that are recomputed at load time.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# One expert's weight in a checkpoint: Mixtral (w1 gate, w3 up, w2 down) and Qwen3-MoE names
EXPERT_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                           r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
# gpt-oss: one layer's stacked experts (E, in, out) and their biases (E, out)
STACKED_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?")
EXPERT_TENSORS = {"w1": gguf.MODEL_TENSOR.FFN_GATE_EXP, "gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP,
                  "w3": gguf.MODEL_TENSOR.FFN_UP_EXP, "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
                  "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP, "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP}


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from and how it is stored."""

    gguf_name: str
    shape: tuple[int, ...]  # numpy order, e.g. (out_features, in_features)
    qtype: gguf.GGMLQuantizationType
    source: Callable[[], np.ndarray]  # returns the transformed f32 array

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return tuple(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> GGML interleaved pairs, per head.

    Rows of one head are (2, head_dim/2): the first and second halves. GGML wants
    (head_dim/2, 2): pairs next to each other. V and O are never permuted.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rope_rows` (GGML layout -> HF layout)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files, from model.safetensors.index.json when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GGUFExportError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise GGUFExportError(f"shard(s) listed in {index.name} are missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(
            f"no model.safetensors (or model.safetensors.index.json) in {model_dir}: "
            "the GGUF export reads safetensors weights only"
        )
    return files


def _storage_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    # Norms, biases (gpt-oss's expert biases are 2-D) and rope factors are tiny and precision-sensitive: always f32.
    if len(shape) < 2 or outtype == "f32" or gguf_name.endswith(".bias"):
        return QT.F32
    qtype = OUTTYPE_QTYPES[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else QT.F16  # rows Q8_0 cannot block: f16, as llama.cpp's converter does


def _reader(path: Path, name: str, transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with safe_open(str(path), framework="pt") as f:  # torch: numpy cannot hold bf16
            t = f.get_tensor(name)
        return transform(t.to(torch.float32).numpy())
    return read


def _stacked_reader(parts: list[tuple[Path, str]]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        return np.stack([_reader(path, name, lambda a: a)() for path, name in parts])
    return read


def _expert_plans(experts: dict[str, dict[int, tuple[Path, str, tuple[int, ...]]]], hp: HParams,
                  outtype: str) -> list[TensorPlan]:
    """One stacked (experts, out, in) tensor per GGUF expert tensor name, experts in order."""
    plans = []
    for gguf_name, by_expert in experts.items():
        if sorted(by_expert) != list(range(hp.n_experts)):
            raise GGUFExportError(f"{gguf_name}: the checkpoint holds experts {sorted(by_expert)}, "
                                  f"config.json says {hp.n_experts}")
        shapes = {by_expert[e][2] for e in by_expert}
        if len(shapes) != 1:
            raise GGUFExportError(f"{gguf_name}: experts of different shapes {sorted(shapes)}")
        shape = (hp.n_experts, *shapes.pop())
        parts = [by_expert[e][:2] for e in range(hp.n_experts)]
        plans.append(TensorPlan(gguf_name, shape, _storage_type(gguf_name, shape, outtype), _stacked_reader(parts)))
    return plans


def _stacked_expert_plans(hf_name: str, path: Path, shape: tuple[int, ...], outtype: str) -> list[TensorPlan] | None:
    """The GGUF expert tensors of one gpt-oss stacked expert tensor (None: ``hf_name`` is not one)."""
    match = STACKED_EXPERT.fullmatch(hf_name)
    if match is None:
        return None
    layer, proj, bias = int(match.group(1)), match.group(2), bool(match.group(3))
    suffix = ".bias" if bias else ".weight"
    # weights (E, in, out) -> (E, out, in); biases (E, out) as they are
    rows = (lambda a: a) if bias else (lambda a: a.swapaxes(1, 2))
    out_shape = shape if bias else (shape[0], shape[2], shape[1])

    def plan(tensor: gguf.MODEL_TENSOR, take: Callable[[np.ndarray], np.ndarray],
             plan_shape: tuple[int, ...]) -> TensorPlan:
        name = gguf.TENSOR_NAMES[tensor].format(bid=layer) + suffix
        return TensorPlan(name, plan_shape, _storage_type(name, plan_shape, outtype),
                          _reader(path, hf_name, lambda a: np.ascontiguousarray(take(a))))
    if proj == "down_proj":
        return [plan(gguf.MODEL_TENSOR.FFN_DOWN_EXP, rows, out_shape)]
    if shape[-1] % 2:
        raise GGUFExportError(f"{hf_name}: {shape[-1]} gate/up columns, expected an even number (interleaved)")
    half = (out_shape[0], out_shape[1] // 2, *out_shape[2:])  # gate: even rows, up: odd rows
    return [plan(gguf.MODEL_TENSOR.FFN_GATE_EXP, lambda a: rows(a)[:, 0::2], half),
            plan(gguf.MODEL_TENSOR.FFN_UP_EXP, lambda a: rows(a)[:, 1::2], half)]


def _transform_for(hf_name: str, gguf_name: str, spec: ArchSpec, hp: HParams) -> Callable[[np.ndarray], np.ndarray]:
    shift = spec.norm_shift if hf_name.endswith("norm.weight") and spec.norm_shift else 0.0
    heads = None
    if spec.permute_qk and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = hp.n_head if gguf_name.split(".")[-2] == "attn_q" else hp.n_head_kv

    def transform(a: np.ndarray) -> np.ndarray:
        if heads is not None:
            a = permute_rope_rows(a, heads)
        if shift:
            a = a + np.float32(shift)
        return np.ascontiguousarray(a, dtype=np.float32)
    return transform


def plan_tensors(model_dir: Path, spec: ArchSpec, hp: HParams, outtype: str) -> list[TensorPlan]:
    """Every tensor of the GGUF file in write order, without reading any data."""
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layers)
    plans: list[TensorPlan] = []
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(TensorPlan(name, factors.shape, QT.F32, lambda: factors))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "longrope":
        for name, factors in longrope_factors(hp).items():
            plans.append(TensorPlan(name, factors.shape, QT.F32, lambda f=factors: f))
    seen: set[str] = set()
    experts: dict[str, dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        for hf_name in names:
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and hp.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            expert = EXPERT_WEIGHT.fullmatch(hf_name) if spec.moe else None
            if expert:
                layer, index, proj = expert.groups()
                stacked = gguf.TENSOR_NAMES[EXPERT_TENSORS[proj]].format(bid=int(layer)) + ".weight"
                experts.setdefault(stacked, {})[int(index)] = (path, hf_name, shapes[hf_name])
                continue
            stacked_plans = _stacked_expert_plans(hf_name, path, shapes[hf_name], outtype) if spec.moe else None
            if stacked_plans is not None:
                plans += stacked_plans
                continue
            sinks = hf_name.endswith(".self_attn.sinks")  # gpt-oss: a parameter without a .weight suffix
            gguf_name = name_map.get_name(hf_name + ".weight" if sinks else hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFExportError(
                    f"tensor {hf_name!r} in {path.name} has no GGUF name for {spec.model_type}: "
                    "the checkpoint has modules llama.cpp does not run (is this a merged model?)"
                )
            if gguf_name in seen:
                raise GGUFExportError(f"tensor {hf_name!r} appears twice across the safetensors shards")
            seen.add(gguf_name)
            shape = shapes[hf_name]
            plans.append(TensorPlan(
                gguf_name, shape, _storage_type(gguf_name, shape, outtype),
                _reader(path, hf_name, _transform_for(hf_name, gguf_name, spec, hp)),
            ))
    plans += _expert_plans(experts, hp, outtype)
    if "token_embd.weight" not in seen:
        raise GGUFExportError(f"no embedding tensor (model.embed_tokens.weight) in {model_dir}'s safetensors")
    if not hp.tie_word_embeddings and "output.weight" not in seen:
        raise GGUFExportError(
            f"config.json says tie_word_embeddings=false but {model_dir}'s safetensors hold no lm_head.weight"
        )
    return plans


def encode(plan: TensorPlan) -> np.ndarray:
    """Read, transform and store one tensor as the bytes (or array) the file holds."""
    a = plan.source()
    if a.shape != plan.shape:
        raise GGUFExportError(f"{plan.gguf_name}: read shape {a.shape}, expected {plan.shape}")
    if plan.qtype == QT.F32:
        return a
    if plan.qtype == QT.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, plan.qtype)
