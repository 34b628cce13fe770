"""Mixture-of-experts blocks (Mixtral, Qwen3-MoE, gpt-oss) on the triton engine: top-k routing, grouped GEMMs.

transformers 5 stores each block's experts as two 3-D parameters, ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I); peft adapts them through ``target_parameters`` (``lora.ParamWrapper``), one
LoRA per expert: ``lora_A.weight`` (E r, in) is A_e = rows [e r, (e + 1) r), ``lora_B.weight``
(out, r E) holds B_e as columns e, e + E, … (peft's reshape (out, r, E)), and expert e's weight
is W_e + s B_e A_e, exactly the delta peft merges.

The block here routes like the HF router (softmax in fp32, top-k, Mixtral renormalises the k
weights, Qwen3-MoE when ``norm_topk_prob``), sorts the (token, choice) pairs by expert, and
runs each projection as one grouped GEMM over all experts (``kernels/grouped_gemm.py``): base
x W_e^T, LoRA (x A_e^T) B_e^T, both grouped. The k outputs of a token are weighted and summed
with one ``index_add_``.

gpt-oss's experts differ in four ways, all on the same path: the router has a bias (softmax over the
top-k biased logits is the full softmax renormalised over those k), each expert weight is stored
(E, in, out) (x @ W_e: peft's delta is laid out the same way), both projections add a per-expert bias,
and the activation is a clamped SwiGLU over *interleaved* gate/up columns (:func:`clamped_swiglu`).

The load-balancing loss (HF's ``load_balancing_loss_func`` on the real tokens, when the config sets
``output_router_logits``) needs every layer's router probabilities, but a checkpointed layer keeps
no graph. Its gradient is simple, though: aux = E sum_e (C_e / R)(P_e / R) over R = layers x tokens
rows, with C_e the top-k picks of expert e (no gradient) and P_e the summed probabilities, so
d aux / d p[row, e] = E C_e / R^2, the same for every row of every layer. The blocks therefore log
their router logits without graph (:class:`RouterLogits`); after the forward the engine computes the
loss value and that per-expert gradient; each block's probabilities pass through an identity
(``_AuxGradient``) whose backward adds it, times the gradient the objective gives the summed loss
(read off the loss tensor by a hook when backward starts). That backward runs in the recompute of a
checkpointed layer as in a plain one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunedag.kernels.grouped_gemm import group_offsets, grouped_mm

ADAPTER = "default"


@dataclass
class RouterLogits:
    """Shared by the MoE blocks of one model: what the load-balancing loss needs (see the module doc)."""

    enabled: bool = False  # the config's output_router_logits: log and add the loss's gradient
    layers: list[torch.Tensor] = field(default_factory=list)  # (N, E) router logits, no graph; cleared per forward
    grad: torch.Tensor | None = None  # (E,) d(loss term) / d p[row, e], set after the forward
    scale: torch.Tensor | None = None  # d(objective) / d(summed loss), set when backward starts

    def start(self, enabled: bool) -> None:
        """A new forward: with the router loss (``enabled``) or without."""
        self.enabled = enabled
        self.layers.clear()
        self.grad = self.scale = None


class _AuxGradient(torch.autograd.Function):
    """Identity on router probabilities (N, E) whose backward adds the load-balancing loss's gradient."""

    @staticmethod
    def forward(ctx, probs, log):
        ctx.log = log
        return probs.clone()

    @staticmethod
    def backward(ctx, grad):
        log = ctx.log
        if log.grad is None or log.scale is None:
            raise RuntimeError("MoE router loss: backward ran without add_router_loss on this forward's loss")
        return grad + (log.grad * log.scale).to(grad.dtype), None


def _probs_and_picks(router_logits: list[torch.Tensor], num_experts: int, top_k: int):
    """(router probabilities (R, E) of all layers x tokens, top-k picks per expert (E,))."""
    probs = torch.cat([F.softmax(logits.float(), dim=-1) for logits in router_logits])
    picks = torch.topk(probs, top_k, dim=-1).indices
    return probs, torch.bincount(picks.reshape(-1), minlength=num_experts).to(probs.dtype)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all layers' (N, E) router logits, as transformers computes it:
    E * sum_e (share of top-k picks of e) * (mean router probability of e), both over layers x tokens."""
    probs, counts = _probs_and_picks(router_logits, num_experts, top_k)
    rows = probs.shape[0]
    return (counts / rows * (probs.sum(0) / rows)).sum() * num_experts


def _param_lora(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (E, in, r), B (E, r, out), s) of a peft ParamWrapper, laid out for grouped_mm."""
    a, b = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight
    e = wrapper.num_experts
    # contiguous (small): torch._grouped_mm takes (E, K, N) with its last or next-to-last dim dense
    a = a.reshape(e, -1, a.shape[-1]).transpose(1, 2).contiguous()  # (E, in, r)
    b = b.reshape(b.shape[0], -1, e).permute(2, 1, 0).contiguous()  # (E, r, out)
    return a, b, float(wrapper.scaling[ADAPTER])


class FusedLoRAMoE(nn.Module):
    """Sparse MoE block with LoRA on every expert's gate_up and down projections.

    Without peft (full fine-tuning) the experts are the plain HF module: its 3-D weights (fp32 masters
    are cast per call) get their gradients from the grouped GEMMs' weight-gradient pass.
    """

    def __init__(self, replaced: nn.Module, activation: str, log: RouterLogits, switch):
        super().__init__()
        self.gpt_oss = activation == "gpt_oss"
        if self.gpt_oss:  # the router (frozen under LoRA), under its HF name: full fine-tuning saves it by name
            self.router = replaced.router
        else:
            self.gate = replaced.gate
        self.experts = replaced.experts  # peft: ParamWrapper(down_proj) over ParamWrapper(gate_up_proj)
        if hasattr(self.experts, "lora_A"):
            self.down_lora, self.gate_up_lora = self.experts, self.experts.base_layer
            self.base = self.gate_up_lora.base_layer
        else:  # plain experts (full fine-tuning)
            self.down_lora = self.gate_up_lora = None
            self.base = self.experts
        self.top_k = self._router.top_k
        self.num_experts = self._router.num_experts
        self.renormalise = bool(getattr(self._router, "norm_topk_prob", True))  # Mixtral always renormalises
        if self.gpt_oss:
            alpha, limit = self.base.alpha, self.base.limit
            self.glu = lambda gu: clamped_swiglu(gu, alpha, limit)
        else:
            act = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}[activation]
            self.glu = lambda gu: _gated(gu, act)
        self.log, self.switch = log, switch

    @property
    def _router(self) -> nn.Module:
        return self.router if self.gpt_oss else self.gate

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k) in x's dtype, expert ids (N, k)) as the HF router picks them."""
        logits = x @ self._router.weight.to(x.dtype).t()  # (N, E)
        if self.gpt_oss:
            logits = logits + self._router.bias.to(x.dtype)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if self.log.enabled and self.switch.enabled:
            if torch.is_grad_enabled():  # a plain forward, or a checkpointed layer's recompute in backward
                probs = _AuxGradient.apply(probs, self.log)
            if self.log.grad is None:  # not again in a checkpointed layer's recompute
                self.log.layers.append(logits.detach())
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(x.dtype), idx

    def _project(self, rows: torch.Tensor, name: str, wrapper: nn.Module, offs: torch.Tensor, expert: torch.Tensor,
                 lora: bool) -> torch.Tensor:
        """rows (M, in) sorted by expert (``expert`` (M,)) through W_e, plus s (rows A_e^T) B_e^T (and gpt-oss's
        bias b_e). W_e is stored (E, out, in), gpt-oss's (E, in, out)."""
        weight = getattr(self.base, name)
        weight = weight if self.gpt_oss else weight.transpose(1, 2)
        out = grouped_mm(rows, weight.to(rows.dtype), offs)
        if lora:
            a, b, s = _param_lora(wrapper)
            out = out + s * grouped_mm(grouped_mm(rows, a.to(rows.dtype), offs), b.to(rows.dtype), offs)
        if self.gpt_oss:
            out = out + getattr(self.base, f"{name}_bias").to(rows.dtype)[expert]
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        peft = self.down_lora is not None
        lora = peft and self.switch.enabled and not self.down_lora.disable_adapters
        if peft and not lora and torch.is_grad_enabled():
            raise RuntimeError("adapters disabled with gradients enabled: the base-only path is for the "
                               "reference pass, under torch.no_grad()")
        weights, idx = self._route(x)
        flat = idx.reshape(-1)  # (N k,) expert of each (token, choice)
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k  # source token of each sorted row
        expert = flat[order]
        offs = group_offsets(expert, self.num_experts)
        rows = x[token]  # (M, H), M = N k
        gu = self._project(rows, "gate_up_proj", self.gate_up_lora, offs, expert, lora)  # (M, 2I)
        out = self._project(self.glu(gu), "down_proj", self.down_lora, offs, expert, lora)  # (M, H)
        out = out * weights.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, token, out).view(shape)
        # gpt-oss's decoder layer unpacks (hidden states, router scores) and drops the scores
        return (y, None) if self.gpt_oss else y

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, renormalise={self.renormalise}"


def _gated(gu: torch.Tensor, act) -> torch.Tensor:
    """Mixtral / Qwen3-MoE: act(gate) * up over gate_up's halves [gate | up]."""
    g, u = gu.chunk(2, dim=-1)
    return act(g) * u


def clamped_swiglu(gu: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: gate and up interleaved (columns 0, 2, … and 1, 3, …), gate clamped above at ``limit``, up
    to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gu[:, ::2].clamp(max=limit)
    up = gu[:, 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def aux_loss_enabled(config) -> bool:
    """transformers adds ``router_aux_loss_coef`` x the load-balancing loss to the LM loss when
    ``output_router_logits`` is set in the config (off by default)."""
    return bool(getattr(config, "output_router_logits", False)) and hasattr(config, "router_aux_loss_coef")


def aux_loss_sum(router_logits: list[torch.Tensor], config, n_trained: torch.Tensor | int) -> torch.Tensor:
    """coef x aux, times the micro-batch's trained tokens: the engines return *summed* losses that the loop
    divides by the group's trained tokens, so one micro-batch gives HF's mean loss + coef x aux."""
    aux = load_balancing_loss(router_logits, num_experts(config), config.num_experts_per_tok)
    return config.router_aux_loss_coef * aux * n_trained


def add_router_loss(loss: torch.Tensor, log: RouterLogits, config, n_trained: torch.Tensor) -> torch.Tensor:
    """``loss`` + :func:`aux_loss_sum`'s value from the logged logits; arms the blocks' backward with its
    gradient per router probability (see the module doc) and the objective's scale of ``loss``."""
    e = num_experts(config)
    probs, counts = _probs_and_picks(log.layers, e, config.num_experts_per_tok)
    rows = probs.shape[0]
    factor = config.router_aux_loss_coef * n_trained.to(probs.dtype) * e / rows**2
    log.grad = factor * counts  # d(coef aux n) / d p[row, e]
    value = factor * (counts * probs.sum(0)).sum()
    if loss.requires_grad:
        loss.register_hook(lambda g: setattr(log, "scale", g.detach()))
    return loss + value.to(loss.dtype)


def hf_moe_loss_sum(peft_model: nn.Module, inputs: dict, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The torch engine's summed loss of an MoE model with the router loss on: the decoder with its router
    logits, the LM head, cross-entropy, and the aux loss over the real tokens (``keep`` (B*T,) bool).
    (The CausalLM's own aux loss expects a 2-D attention mask, not the packed 4-D one.)"""
    from tunedag.data.formats import IGNORE_INDEX
    from tunedag.models.batch_inputs import loss_sum

    causal_lm = peft_model.get_base_model()
    out = causal_lm.model(**inputs, output_router_logits=True)
    logits = causal_lm.lm_head(out.last_hidden_state)
    keep = keep.to(logits.device)
    n_trained = (labels[:, 1:] != IGNORE_INDEX).sum()
    return loss_sum(logits, labels) + aux_loss_sum([r[keep] for r in out.router_logits], causal_lm.config, n_trained)


# Where a checkpoint (safetensors on disk: transformers 5 saves experts one by one, as the hub holds
# them) keeps expert e's gate, up and down weights, under "model.layers.{i}."
EXPERT_CHECKPOINT_NAMES = {
    "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2"),
    "qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
}
# Checkpoints that keep each layer's experts stacked, as the model holds them: (gate_up, down) under
# "model.layers.{i}.", each (E, in, out) (gpt-oss: x @ W_e; gate_up's columns interleave gate and up)
STACKED_EXPERT_NAMES = {"gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}
# peft's adapter keys of the two expert LoRAs: down_proj's ParamWrapper wraps gate_up_proj's (the
# order of target_parameters), so gate_up's weights sit one ".base_layer" deeper
_EXPERT_ADAPTER = re.compile(r"model\.layers\.(\d+)\.mlp\.experts(\.base_layer)?\.weight")


def expert_loras(name: str, a: torch.Tensor, b: torch.Tensor, config: dict) -> dict[str, tuple] | None:
    """Per-expert (A_e, B_e) of one expert-parameter LoRA, by checkpoint weight name; None for other names.

    ``name``: the adapter's weight name (``model.layers.3.mlp.experts.weight``), a (E r, in), b (out, r E),
    ``config``: the base model's config.json. gate_up's B splits by rows into gate and up, sharing A_e.
    A stacked checkpoint (gpt-oss) gets one 3-D pair for its (E, in, out) weight: "A" (E, r, out) and
    "B" (E, in, r), whose batched product B @ A is each expert's delta in the stored layout.
    """
    match = _EXPERT_ADAPTER.fullmatch(name)
    if match is None:
        return None
    e = config.get("num_local_experts") or config["num_experts"]
    a_e = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
    b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
    prefix = f"model.layers.{match.group(1)}."
    stacked = STACKED_EXPERT_NAMES.get(config.get("model_type"))
    if stacked is not None:  # one (E, in, out) weight: its delta (B_e A_e)^T = A_e^T B_e^T, as "B" @ "A"
        return {prefix + stacked[0 if match.group(2) else 1]: (b_e.transpose(1, 2), a_e.transpose(1, 2))}
    names = EXPERT_CHECKPOINT_NAMES.get(config.get("model_type"))
    if names is None:
        known = [*EXPERT_CHECKPOINT_NAMES, *STACKED_EXPERT_NAMES]
        raise ValueError(f"{name}: expert LoRA on a {config.get('model_type')!r} model, whose checkpoint layout "
                         f"is not known here (known: {', '.join(known)})")
    out = {}
    for i in range(e):
        if match.group(2):  # gate_up: rows [gate; up]
            gate, up = b_e[i].chunk(2, dim=0)
            out[prefix + names[0].format(e=i) + ".weight"] = (a_e[i], gate)
            out[prefix + names[1].format(e=i) + ".weight"] = (a_e[i], up)
        else:
            out[prefix + names[2].format(e=i) + ".weight"] = (a_e[i], b_e[i])
    return out
