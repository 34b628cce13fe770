"""Log-probabilities of the response tokens of every segment of a packed batch.

A sequence's log-probability is the sum of its response tokens' log-probs, read from the same
packed forward pass as supervised training: chosen and rejected go through the model in one
batch, and the packed mask keeps them from seeing each other.

Memory: the [tokens, vocab] logits are never materialised. Only the trained positions' hidden
states are kept, and the LM head + log-softmax run over ``chunk_tokens`` of them at a time under
activation checkpointing, so forward and backward hold one [chunk, vocab] block at once (the
idea of the fused linear cross-entropy). An engine that hands over a ``LinearHead`` (the triton
engine) gets the fused kernel instead (``tunedag.kernels.cross_entropy.fused_linear_token_logps``):
one block of logits in the compute dtype rather than fp32 copies, and with a frozen head no
recomputation in backward.

Reference model: with LoRA it is the same model with its adapters (and modules_to_save)
disabled through peft's ``disable_adapter()``: no second copy in memory, one extra forward pass
without gradients (the triton engine's fused modules honour it and run the frozen base alone).
Engines hand their final hidden states and LM head to ``hidden_logps``; ``sequence_logps`` runs
an HF model's decoder and head itself.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from tunedag.data.batches import segment_index
from tunedag.data.formats import IGNORE_INDEX
from tunedag.kernels.cross_entropy import fused_linear_token_logps
from tunedag.models.batch_inputs import model_inputs

CHUNK_TOKENS = 1024


@dataclass
class SequenceLogps:
    """Per-segment sums of response-token log-probs, in batch order (row by row, segment by segment)."""

    logps: torch.Tensor  # (S,) float32
    tokens: torch.Tensor  # (S,) response tokens per segment
    labels: torch.Tensor  # (S,) segment label: 1 chosen/desirable, 0 rejected/undesirable

    def mean(self) -> torch.Tensor:
        return self.logps / self.tokens.clamp(min=1)


@dataclass
class LinearHead:
    """An LM head given as its weight (V, H) and bias: ``token_logps`` runs the fused kernel on it."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


Head = Callable[[torch.Tensor], torch.Tensor] | LinearHead


def _chunk_logps(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module,
                 softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V): the only vocab-sized block alive
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, target[:, None])[:, 0] - torch.logsumexp(logits, -1)


def token_logps(hidden: torch.Tensor, target: torch.Tensor, head: Head,
                chunk_tokens: int = CHUNK_TOKENS, softcap: float | None = None) -> torch.Tensor:
    """log p(target | hidden) for (N, H) hidden states, ``chunk_tokens`` rows of logits at a time.

    Each chunk runs under checkpointing, so its logits are recomputed in backward rather than
    kept: peak extra memory is one (chunk_tokens, vocab) fp32 block, e.g. 1024 × 128256 × 4 B =
    0.5 GB for Llama 3, instead of N × vocab for the whole batch. A ``LinearHead`` goes through
    the fused kernel, which sizes its own chunks (``chunk_rows_for``).
    """
    if isinstance(head, LinearHead):
        return fused_linear_token_logps(hidden, head.weight, target, head.bias, IGNORE_INDEX, softcap)
    out = []
    for a in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[a:a + chunk_tokens], target[a:a + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logps, h, t, head, softcap, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, t, head, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_logps(hidden: torch.Tensor, batch: dict[str, torch.Tensor], head: Head,
                 keep: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS,
                 softcap: float | None = None) -> SequenceLogps:
    """Response log-probs of every segment from an engine's final hidden states and its LM head.

    ``hidden``: (B·T, H) for every position of the (B, T) batch, or (N, H) for the positions that
    ``keep`` (B·T,) bool selects (an engine that drops padding). ``head`` maps (n, H) to (n, V) logits,
or is a ``LinearHead`` for the fused kernel.
    """
    device = hidden.device
    labels = batch["labels"]
    index, seg_labels = segment_index(batch)
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]  # target t+1 is predicted at position t
    where = torch.full_like(index, -1)
    where[:, :-1] = index[:, 1:]
    target, where = target.reshape(-1), where.reshape(-1)
    if keep is not None:
        keep = keep.cpu()
        target, where = target[keep], where[keep]
    trained = target != IGNORE_INDEX
    h = hidden[trained.to(device)]  # (n, H): only trained positions go through the head
    target, where = target[trained].to(device), where[trained].to(device)
    logp = token_logps(h, target, head, chunk_tokens, softcap)
    n = seg_labels.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, where, logp)
    counts = torch.zeros(n, dtype=torch.long, device=device).index_add(0, where, torch.ones_like(where))
    return SequenceLogps(sums, counts, seg_labels.to(device))


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                   chunk_tokens: int = CHUNK_TOKENS) -> SequenceLogps:
    """Response log-probs of every segment of a packed preference batch, in one forward pass."""
    lm = unwrap_model(model)
    # the additive mask in the weights' dtype, as transformers builds its own: an fp32 mask beside bf16
    # weights outside autocast gave NaN log-probs on an H200 (a bf16 mask's minimum is still finite)
    hidden = lm.get_decoder()(**model_inputs(batch, device, lm.dtype, lm.config)).last_hidden_state  # (B, T, H)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return hidden_logps(hidden.reshape(-1, hidden.shape[-1]), batch, lm.get_output_embeddings(),
                        chunk_tokens=chunk_tokens, softcap=softcap)


def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                    chunk_tokens: int = CHUNK_TOKENS) -> SequenceLogps:
    """The same log-probs under the reference: ``model`` with its adapters disabled, no gradients."""
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), disable:
        return sequence_logps(model, batch, device, chunk_tokens)
