"""Put the fused modules into a peft-wrapped HF causal LM, and record what was replaced.

Replacement is by module (``setattr`` on the parent), never by swapping an instance's
``forward``: the decoder layers keep HF's own forward and call our modules through their
usual attributes. ``patch_model`` returns a :class:`PatchRecord`, also stored on the model as
``model.tunedag_patches``, that lists every replaced module path with its old and new class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tunedag.kernels.nf4 import NF4Weight
from tunedag.models.fused_modules import AdapterSwitch, FusedLoRAAttention, FusedLoRAMLP, FusedRMSNorm
from tunedag.models.moe import FusedLoRAMoE, RouterLogits
from tunedag.models.registry import ARCHITECTURES, REPLACED, mlp_activation


@dataclass
class PatchRecord:
    """What the triton engine replaced in one model."""

    architecture: str
    roles: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(REPLACED))
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (old class, new class)
    nf4_weights: list[str] = field(default_factory=list)  # projections held in NF4 (QLoRA)
    adapters: AdapterSwitch = field(default_factory=AdapterSwitch)  # read by every fused LoRA module
    router_logits: RouterLogits = field(default_factory=RouterLogits)  # MoE blocks' logits of one forward

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for _, new in self.modules.values():
            counts[new] = counts.get(new, 0) + 1
        parts = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        nf4 = f"; {len(self.nf4_weights)} NF4 base weights" if self.nf4_weights else ""
        return f"{self.architecture}: {parts}; loss: fused linear cross-entropy{nf4}"


def _replace(record: PatchRecord, parent: nn.Module, path: str, attr: str, new: nn.Module) -> None:
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    record.modules[f"{path}.{attr}" if path else attr] = (type(old).__name__, type(new).__name__)


def _sliding_window(attn: nn.Module, config, spec) -> int | None:
    if hasattr(attn, "sliding_window"):  # Gemma-2/3, Qwen2: per layer
        return attn.sliding_window
    if spec.window_from_config:  # Mistral, Phi-3: every layer, from the config
        return getattr(config, "sliding_window", None)
    return None


def patch_model(peft_model: nn.Module, nf4: dict[str, NF4Weight] | None = None) -> PatchRecord:
    """Replace norms, attention and MLP of every decoder layer, and the final norm, in place.

    ``nf4``: {module name in ``peft_model`` -> NF4Weight} for QLoRA base weights. The record's
    ``adapters`` switch turns the LoRA of every fused module off and on at once.
    """
    nf4 = nf4 or {}
    # a peft model, or under full fine-tuning the HF causal LM itself
    causal_lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = causal_lm.config
    spec = ARCHITECTURES[config.model_type]
    activation = mlp_activation(spec, config)
    record = PatchRecord(architecture=config.model_type, nf4_weights=sorted(nf4))
    # names in the nf4 map are relative to peft_model; the fused modules look them up by prefix
    root = {id(m): n for n, m in peft_model.named_modules()}
    decoder = causal_lm.model
    for i, layer in enumerate(decoder.layers):
        path = root[id(layer)]
        attn = layer.self_attn
        _replace(record, layer, path, "self_attn", FusedLoRAAttention(
            attn, config, nf4, f"{path}.self_attn", spec.qk_norm, spec.gemma_norm, _sliding_window(attn, config, spec),
            record.adapters))
        # Gemma-2/3 normalise the MLP's output before the residual add: that norm's backward reads it
        mlp = (FusedLoRAMoE(layer.mlp, activation, record.router_logits, record.adapters) if spec.moe
               else FusedLoRAMLP(layer.mlp, nf4, f"{path}.mlp", activation, record.adapters,
                                 output_to_residual=not hasattr(layer, "post_feedforward_layernorm")))
        _replace(record, layer, path, "mlp", mlp)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            if hasattr(layer, name):
                _replace(record, layer, path, name, FusedRMSNorm(getattr(layer, name), spec.gemma_norm))
        if spec.qk_norm:
            record.modules[f"{path}.self_attn.q_norm"] = ("Qwen3RMSNorm", "FusedRMSNorm")
            record.modules[f"{path}.self_attn.k_norm"] = ("Qwen3RMSNorm", "FusedRMSNorm")
    _replace(record, decoder, root[id(decoder)], "norm", FusedRMSNorm(decoder.norm, spec.gemma_norm))
    peft_model.tunedag_patches = record
    return record
