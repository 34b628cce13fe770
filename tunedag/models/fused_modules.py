"""The modules the triton engine puts in place of a decoder's norms, attention and MLP.

Each takes over the *same child modules and parameters* as the HF module it replaces (peft's
LoRA Linears with their ``lora_A``/``lora_B``, the norm weight), so parameter names, and with
them peft's adapter files and checkpoints, are unchanged. The frozen base weight of a LoRA
projection is its ``base_layer.weight``, or an ``NF4Weight`` under QLoRA (``nf4`` maps the
projection's name to it; the dense weight is then dropped). Under full fine-tuning the
projections are plain Linears (no peft): the same kernels run without A/B and return each
weight's gradient when it requires grad; a trained weight is an fp32 master cast per call to
the activations' dtype.

Adapters off: when the model's :class:`AdapterSwitch` is off (the triton engine's reference pass
for ``rl: dpo | kto``), or inside peft's ``model.disable_adapter()`` (the LoRA Linears then report
``disable_adapters``), the fused attention and MLP run the frozen base alone (dense or
NF4-dequantised matmuls, no LoRA matmuls at all). That path is inference only: it keeps nothing
for backward, and it refuses to run with gradients enabled.

Shapes: the engine flattens a micro-batch to its N real tokens, so hidden states are
(1, N, H) and the attention works on (N, heads, head_dim) views.

Checkpoint recompute (inside :func:`recomputing_for_backward`): a layer runs again only to rebuild
what its backward needs, and its output is thrown away. A fused MLP whose output goes straight into
the residual stream (every dense architecture but Gemma-2/3, which normalise it first) then skips its
down projection: backward needs that projection's input, never its output.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import nn

from tunedag.kernels.lora_mlp import act_mul, lora_mlp
from tunedag.kernels.lora_qkv import lora_o, lora_qkv
from tunedag.kernels.nf4 import NF4Weight, maybe_dequantize
from tunedag.kernels.rms_norm import rms_norm
from tunedag.kernels.rope import rope
from tunedag.models.packed_attention import PackedSequences, packed_attention

ADAPTER = "default"  # peft's adapter name


@dataclass
class AdapterSwitch:
    """One per patched model, read by all its fused modules: ``enabled = False`` runs the frozen base.

    A flag flip, where peft's ``disable_adapter()`` walks every module of the model and toggles the
    adapters' requires_grad on the way in and out (~0.1 s a call for an 8B model on a slow host).
    """

    enabled: bool = True


class FusedRMSNorm(nn.Module):
    """RMSNorm through the Triton kernel, sharing the replaced module's weight parameter."""

    def __init__(self, replaced: nn.Module, gemma: bool):
        super().__init__()
        self.weight = replaced.weight
        self.eps = float(getattr(replaced, "variance_epsilon", getattr(replaced, "eps", 1e-6)))
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a trained norm weight is an fp32 master (full fine-tuning): computed in x's dtype
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return rms_norm(x, w, self.eps, gemma=self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, gemma={self.gemma}"


def _base_layer(proj: nn.Module) -> nn.Module:
    """The Linear holding a projection's base weight: peft's ``base_layer``, or the projection itself
    (a plain Linear: full fine-tuning)."""
    return getattr(proj, "base_layer", proj)


def _lora_parts(proj: nn.Module, nf4: dict[str, NF4Weight], name: str):
    """(base weight or NF4Weight, A (r, in), B (out, r)) of one peft LoRA Linear; A and B are None
    for a plain Linear (full fine-tuning)."""
    base = nf4.get(name, _base_layer(proj).weight)
    if not hasattr(proj, "lora_A"):
        return base, None, None
    return base, proj.lora_A[ADAPTER].weight, proj.lora_B[ADAPTER].weight


def _add_bias(y: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """A base bias (Qwen2's q/k/v) is added after the fused projection."""
    bias = _base_layer(proj).bias
    return y if bias is None else y + bias.to(y.dtype)


def _scaling(proj: nn.Module) -> float:
    return float(proj.scaling[ADAPTER]) if hasattr(proj, "lora_A") else 1.0


def _adapters_off(switch: AdapterSwitch, proj: nn.Module) -> bool:
    """True when the switch is off or inside peft's ``disable_adapter()``: run the frozen base alone."""
    if switch.enabled and not getattr(proj, "disable_adapters", False):
        return False
    if torch.is_grad_enabled():
        raise RuntimeError("adapters disabled with gradients enabled: the fused modules' base-only path is "
                           "for the reference pass, under torch.no_grad()")
    return True


def _base(x: torch.Tensor, proj: nn.Module, nf4: dict[str, NF4Weight], name: str) -> torch.Tensor:
    """x (N, in) @ the frozen base weight (dense or NF4-dequantised) -> (N, out); no LoRA."""
    return x @ maybe_dequantize(nf4.get(name, _base_layer(proj).weight), x.dtype).t()


class FusedLoRAAttention(nn.Module):
    """Q/K/V with one fused LoRA call, (Qwen3) q/k norms, in-place RoPE, packed attention, LoRA O."""

    def __init__(self, replaced: nn.Module, config, nf4: dict[str, NF4Weight], prefix: str,
                 qk_norm: bool, gemma_norm: bool, sliding_window: int | None, switch: AdapterSwitch):
        super().__init__()
        self.switch = switch
        self.qkv_proj = getattr(replaced, "qkv_proj", None)  # Phi-3: one packed projection, one LoRA
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = replaced.q_proj, replaced.k_proj, replaced.v_proj
        self.o_proj = replaced.o_proj
        self.qkv_sizes = [n * replaced.head_dim for n in (config.num_attention_heads, config.num_key_value_heads,
                                                          config.num_key_value_heads)]
        self.q_norm = FusedRMSNorm(replaced.q_norm, gemma_norm) if qk_norm else None
        self.k_norm = FusedRMSNorm(replaced.k_norm, gemma_norm) if qk_norm else None
        self.head_dim = replaced.head_dim
        self.scaling = float(replaced.scaling)
        self.softcap = getattr(replaced, "attn_logit_softcapping", None)
        self.sliding_window = sliding_window
        self.sinks = getattr(replaced, "sinks", None)  # gpt-oss: (Hq,) sink logits in the softmax denominator
        self.layer_idx = replaced.layer_idx
        self._nf4 = {n: nf4[f"{prefix}.{n}"] for n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
                     if f"{prefix}.{n}" in nf4}

    def _qkv(self, x: torch.Tensor, off: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, Hq*D), k, v (N, Hk*D) of x (N, H), with their LoRA unless ``off``."""
        if self.qkv_proj is not None:  # packed: one LoRA Linear, then split by columns
            p = self.qkv_proj
            qkv = _base(x, p, self._nf4, "qkv_proj") if off else lora_o(x, *_lora_parts(p, self._nf4, "qkv_proj"),
                                                                         _scaling(p))
            qkv, (nq, nk, _) = _add_bias(qkv, p), self.qkv_sizes
            # separate slices, not split(): RoPE rotates q and k in place, which split's views forbid
            return qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        if off:
            q, k, v = (_base(x, getattr(self, p), self._nf4, p) for p in ("q_proj", "k_proj", "v_proj"))
        else:
            parts = [_lora_parts(getattr(self, p), self._nf4, p) for p in ("q_proj", "k_proj", "v_proj")]
            q, k, v = lora_qkv(x, *parts[0], *parts[1], *parts[2], _scaling(self.q_proj))
        return tuple(_add_bias(y, p) for y, p in zip((q, k, v), (self.q_proj, self.k_proj, self.v_proj)))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask: PackedSequences | None = None, **kwargs):
        if not isinstance(attention_mask, PackedSequences):
            raise TypeError("FusedLoRAAttention needs the engine's PackedSequences as attention_mask")
        n = hidden_states.shape[-2]
        x = hidden_states.reshape(n, -1)
        off = _adapters_off(self.switch, self.o_proj)
        q, k, v = self._qkv(x, off)
        q = q.reshape(n, -1, self.head_dim)  # (N, Hq, D)
        k = k.reshape(n, -1, self.head_dim)  # (N, Hk, D)
        v = v.reshape(n, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings  # (1, N, R): R < D rotates the first R dims only (partial rotary)
        q4, k4, rot = q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos.shape[-1]  # (1, H, N, D) views
        qr, kr = rope(q4[..., :rot], k4[..., :rot], cos, sin)  # in place
        if rot < self.head_dim:  # the rotated dims' graph runs through rope's outputs
            qr, kr = torch.cat([qr, q4[..., rot:]], dim=-1), torch.cat([kr, k4[..., rot:]], dim=-1)
        q, k = qr[0].transpose(0, 1), kr[0].transpose(0, 1)
        out = packed_attention(q, k, v, attention_mask, self.scaling, self.softcap, self.sliding_window, self.sinks)
        out = out.reshape(n, -1)
        if off:
            y = _base(out, self.o_proj, self._nf4, "o_proj")
        else:
            y = lora_o(out, *_lora_parts(self.o_proj, self._nf4, "o_proj"), _scaling(self.o_proj))
        y = _add_bias(y, self.o_proj)
        return y.view(hidden_states.shape[:-1] + (y.shape[-1],)), None


_recompute = threading.local()


@contextlib.contextmanager
def recomputing_for_backward():
    """Marks a checkpointed layer's second forward, whose output nobody reads (see the module docstring)."""
    _recompute.on = True
    try:
        yield
    finally:
        _recompute.on = False


class FusedLoRAMLP(nn.Module):
    """Gated MLP (SwiGLU or GeGLU-tanh) with LoRA on gate/up/down in one autograd Function.

    ``output_to_residual``: the layer adds this MLP's output to the residual stream as it is, so a
    checkpoint recompute may skip the down projection.
    """

    def __init__(self, replaced: nn.Module, nf4: dict[str, NF4Weight], prefix: str, activation: str,
                 switch: AdapterSwitch, output_to_residual: bool = False):
        super().__init__()
        self.switch = switch
        self.output_to_residual = output_to_residual
        self.gate_up_proj = getattr(replaced, "gate_up_proj", None)  # Phi-3: packed [gate; up], one LoRA
        if self.gate_up_proj is None:
            self.gate_proj, self.up_proj = replaced.gate_proj, replaced.up_proj
        self.down_proj = replaced.down_proj
        self.activation = activation
        self._nf4 = {n: nf4[f"{prefix}.{n}"] for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
                     if f"{prefix}.{n}" in nf4}

    def _gate_up_parts(self) -> list[tuple]:
        """(W, A, B) of gate and of up. Packed: row halves of W and B, one shared A (autograd sums its
        two gradients), which is exactly peft's one LoRA over [gate; up]."""
        if self.gate_up_proj is None:
            return [_lora_parts(getattr(self, p), self._nf4, p) for p in ("gate_proj", "up_proj")]
        w, a, b = _lora_parts(self.gate_up_proj, {}, "gate_up_proj")
        half = w.shape[0] // 2
        return [(w[:half], a, None if b is None else b[:half]), (w[half:], a, None if b is None else b[half:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _adapters_off(self.switch, self.down_proj):
            x2 = x.reshape(-1, x.shape[-1])
            if self.gate_up_proj is not None:
                g, u = _base(x2, self.gate_up_proj, self._nf4, "gate_up_proj").chunk(2, dim=-1)
            else:
                g, u = (_base(x2, getattr(self, p), self._nf4, p) for p in ("gate_proj", "up_proj"))
            y = _base(act_mul(g.contiguous(), u.contiguous(), self.activation), self.down_proj, self._nf4, "down_proj")
            return y.view(x.shape[:-1] + (y.shape[-1],))
        if "gate_up_proj" in self._nf4:
            return self._nf4_packed(x)
        parts = [*self._gate_up_parts(), _lora_parts(self.down_proj, self._nf4, "down_proj")]
        output = not (self.output_to_residual and getattr(_recompute, "on", False))
        return lora_mlp(x, *parts[0], *parts[1], *parts[2], _scaling(self.down_proj), self.activation, output)

    def _nf4_packed(self, x: torch.Tensor) -> torch.Tensor:
        """QLoRA on a packed [gate; up] (NF4 blocks cannot be split by rows): its LoRA projection, the
        activation in autograd, then down; three steps instead of the one fused Function."""
        gate_up = self.gate_up_proj
        g, u = lora_o(x, *_lora_parts(gate_up, self._nf4, "gate_up_proj"), _scaling(gate_up)).chunk(2, dim=-1)
        act = nn.functional.silu(g) if self.activation == "silu" else nn.functional.gelu(g, approximate="tanh")
        return lora_o(act * u, *_lora_parts(self.down_proj, self._nf4, "down_proj"), _scaling(self.down_proj))

    def extra_repr(self) -> str:
        return f"activation={self.activation}, nf4={sorted(self._nf4)}, output_to_residual={self.output_to_residual}"
