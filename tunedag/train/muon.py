"""Muon (``optimizer: muon``) for the hidden weight matrices, AdamW for the rest, in one optimizer:
Axolotl's Muon (its MIT contribs, after Dion's) in plain torch.

Split of the trained parameters (:func:`muon_groups`, Axolotl's):

- Muon: every matrix (2 or more dimensions) except the embeddings and ``lm_head`` (by name:
  ``embed_tokens``, ``lm_head``, or a PEFT ``modules_to_save`` copy), with weight decay;
- AdamW, weight decay 0: the embeddings and ``lm_head``;
- AdamW: vectors (norms, biases), weight decay only for names without ``bias`` or ``norm``
  (transformers' rule).

Both take ``learning_rate`` and the schedule's factor; AdamW its betas and eps. A Muon step, per
matrix ``X`` of shape (out, in) with gradient ``G`` and momentum ``M``::

    M = mu * M + G;  U = G + mu * M (Nesterov)      mu = 0.95
    O = orthogonalise(U)                             5 Newton-Schulz steps in bf16
    X = X * (1 - lr * weight_decay) - lr * sqrt(out / in) * O

The Newton-Schulz iteration is the quintic of Keller Jordan's Muon (coefficients 3.4445, -4.7750,
2.0315, also ``torch.optim.Muon``'s): it maps U's singular values near 1 (U V^T of its SVD, up to
a spread the method accepts). ``sqrt(out / in)`` is Dion's and Axolotl's ``spectral_norm`` learning-
rate adjustment. A stack of matrices (a mixture of experts' weights) is orthogonalised matrix by matrix.

On FSDP2 a matrix is a DTensor sharded on its rows: the momentum is updated on the local rows, the
whole ``U`` is gathered, every rank orthogonalises it and keeps its own rows. ``torch.optim.Muon``
exists on torch 2.11 and 2.13 but takes matrices only, its momentum is an average (the same
direction after orthogonalising) and it has no ``spectral_norm`` adjustment, hence this one.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate

from tunedag.train.quantized_adamw import StateKeepingOptimizer, adamw_step, local

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
NO_DECAY = re.compile(r"bias|norm", re.IGNORECASE)


def orthogonalise(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz approximation of ``U V^T`` for each matrix of ``update`` (..., rows, cols), in bf16."""
    x = update.to(torch.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def spectral_norm_lr(lr: float, shape: torch.Size) -> float:
    """Dion's ``spectral_norm`` adjustment: from spectral norm 1 to RMS operator norm 1 (arXiv:2310.17813)."""
    return lr * math.sqrt(shape[-2] / shape[-1])


def _whole(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole matrix of this rank's rows ``update`` of ``param`` (gathered when ``param`` is a DTensor)."""
    if not isinstance(param, DTensor):
        return update
    return DTensor.from_local(update, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()


def _own_rows(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``whole`` as ``param`` is sharded (no communication)."""
    if not isinstance(param, DTensor):
        return whole
    mesh = param.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements).to_local()


@torch.no_grad()
def muon_step(param: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
    """One Muon update of ``param`` (see the module's doc)."""
    if not state:
        state["momentum_buffer"] = torch.zeros_like(param, dtype=torch.float32)
    weight, grad = local(param), local(param.grad).float()
    momentum, mu = local(state["momentum_buffer"]), group["momentum"]
    momentum.mul_(mu).add_(grad)
    update = grad.add(momentum, alpha=mu) if group["nesterov"] else momentum
    whole = orthogonalise(_whole(update, param))
    lr = float(group["lr"])
    updated = weight.float().mul_(1 - lr * group["weight_decay"])
    updated.add_(_own_rows(whole, param).float(), alpha=-spectral_norm_lr(lr, param.shape))
    weight.copy_(updated)


class Muon(StateKeepingOptimizer):
    """Muon over the groups with ``use_muon: True``, AdamW (fp32 moments) over the others."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        use_muon=False, bits=None, block_size=0)
        super().__init__(groups, defaults)

    def update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (muon_step if group["use_muon"] else adamw_step)(param, state, group)


def is_embedding(name: str) -> bool:
    return name.endswith("modules_to_save.default.weight") or any(e in name for e in EMBEDDING_NAMES)


def muon_groups(named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """The parameter groups of :class:`Muon` (the split in the module's doc); empty groups left out."""
    buckets: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, param in named:
        if is_embedding(name):
            key = (False, 0.0)
        elif param.dim() >= 2:
            key = (True, weight_decay)
        else:
            key = (False, 0.0 if NO_DECAY.search(name) else weight_decay)
        buckets.setdefault(key, []).append(param)
    return [{"params": params, "use_muon": use_muon, "weight_decay": decay}
            for (use_muon, decay), params in buckets.items()]
