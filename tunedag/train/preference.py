"""Preference objectives (``rl: dpo | orpo | kto``) on the packed preference shards.

A dpo row holds pairs as adjacent segments, chosen then rejected (``segment_labels`` 1, 0, …),
each with its prompt masked; a kto row holds single samples labelled 1 (desirable) or 0. The
sequence log-probs come from :mod:`tunedag.models.logprobs`: engines hand their final hidden
states and LM head to ``hidden_logps`` and the result to ``PreferenceObjective.loss_from_logps``;
``PreferenceObjective.loss_sum`` does both for an HF model, the reference being the same model
with its adapters disabled.

A full fine-tune (``adapter: null``) has no adapter to switch off: dpo (sigmoid, ipo) and kto then
compare with :func:`frozen_reference`, a copy of the policy as it starts, in eval mode, without
gradients, in the dtype the policy computes in (bf16 on CUDA: 2 bytes per parameter beside the
policy's 16 with AdamW; fp32 on the CPU, where the policy computes in fp32); its log-probs are
computed under no_grad, so it holds no activations for backward. orpo needs no reference.

With ``precompute_ref_log_probs`` the loop computes every training row's reference log-probs once,
before the first step (:mod:`tunedag.train.reference_table`), and hands them to the objective in
the batch under ``REFERENCE_LOGPS``: a training step then runs no reference pass.

Losses, per pair (dpo/orpo) or per sample (kto); ``loss_sum`` returns their sum and
``loss_units`` their count, so the loop's "sum, then divide by the group's count" yields the mean
over pairs, however a step is split into micro-batches:

- DPO sigmoid: ``-(1-ε)·logσ(β·Δ) - ε·logσ(-β·Δ)`` with Δ = (logπ_c - logπref_c) - (logπ_r - logπref_r),
  ε = ``dpo_label_smoothing`` (conservative DPO; ε = 0 is the DPO paper's loss).
- IPO: ``(Δ' - 1/(2β))²`` where Δ' uses per-token mean log-ratios (as TRL does).
- ORPO: ``NLL_c - α·logσ(log odds_c - log odds_r)`` on per-token mean log-probs, odds = p/(1-p);
  the NLL is the chosen response's mean token loss (TRL averages it over the batch's tokens instead).
- KTO: ``w_d·(1-σ(β(r-z)))`` for desirable, ``w_u·(1-σ(β(z-r)))`` for undesirable samples, r the
  log-ratio and z = max(0, mean r over the micro-batch), detached: TRL estimates z from mismatched
  prompt/completion pairs, which packed rows do not hold; the batch mean is the cheaper estimate.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tunedag.config import RunConfig
from tunedag.data.batches import PreferenceDataError, pair_indices
from tunedag.data.formats import IGNORE_INDEX
from tunedag.models.logprobs import CHUNK_TOKENS, SequenceLogps, reference_logps, sequence_logps

REFERENCE_LOGPS = "reference_logps"  # a batch's precomputed reference log-probs, one per segment, in batch order


# --------------------------------------------------------------------------- losses (per pair / sample)

def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO sigmoid loss per pair; ``label_smoothing`` ε > 0 gives conservative DPO."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def ipo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """IPO loss per pair on per-token mean log-ratios; beta is the paper's tau."""
    delta = ((chosen - ref_chosen) / chosen_tokens.clamp(min=1)
             - (rejected - ref_rejected) / rejected_tokens.clamp(min=1))
    return (delta - 1 / (2 * beta)) ** 2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """logσ(log odds(chosen) - log odds(rejected)) per pair, from per-token mean log-probs."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, beta: float, kl: torch.Tensor,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO loss per sample given the reference point ``kl`` (a detached scalar)."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)


# --------------------------------------------------------------------------- the objective

@dataclass
class PreferenceObjective:
    """``rl``'s loss over a packed preference batch, for an engine's ``loss_sum``."""

    run: RunConfig
    chunk_tokens: int = CHUNK_TOKENS
    reference: torch.nn.Module | None = None  # a full fine-tune's frozen base; None: the adapters-off model

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: pairs (dpo, orpo) or samples (kto)."""
        segments = int((batch["segment_labels"] >= 0).sum())
        return segments if self.run.rl == "kto" else segments // 2

    @property
    def needs_reference(self) -> bool:
        """dpo (sigmoid, ipo) and kto compare with the reference model; orpo does not."""
        return self.run.compares_with_reference

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """The summed loss of an HF (peft) ``model``'s forward passes over ``batch``."""
        with autocast():
            policy = sequence_logps(model, batch, device, self.chunk_tokens)
            ref = self.reference_for(batch, lambda: self.live_reference(model, batch, device))
        return self.loss_from_logps(policy, ref)

    def live_reference(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       device: torch.device) -> SequenceLogps:
        """The reference's log-probs of ``batch``, computed now: a full fine-tune's frozen base, else ``model``
        (an HF peft model) with its adapters disabled."""
        if self.reference is not None:
            return self.frozen_reference_logps(batch, device)
        return reference_logps(model, batch, device, self.chunk_tokens)

    def reference_for(self, batch: dict[str, torch.Tensor], live: Callable[[], SequenceLogps]) -> torch.Tensor | None:
        """(segments,) reference log-probs of ``batch``: the precomputed ones it carries, else ``live()``'s;
        None for orpo, which has no reference."""
        if not self.needs_reference:
            return None
        if REFERENCE_LOGPS in batch:
            return batch[REFERENCE_LOGPS]
        return live().logps

    def frozen_reference_logps(self, batch: dict[str, torch.Tensor], device: torch.device) -> SequenceLogps:
        """The log-probs of a full fine-tune's frozen reference: its bf16 weights under bf16 autocast on CUDA
        (as the torch engine runs its policy), whatever the calling engine's own precision setting."""
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            return reference_logps(self.reference, batch, device, self.chunk_tokens)

    def loss_from_logps(self, policy: SequenceLogps, ref: torch.Tensor | None) -> torch.Tensor:
        """The summed loss from the policy's log-probs and (dpo, kto) the reference's, one per segment, from any
        engine."""
        run = self.run
        if ref is not None:
            ref = ref.to(policy.logps.device, torch.float32)
        if run.rl == "kto":
            ratio = (policy.logps - ref).detach()
            kl = ratio.mean().clamp(min=0)
            return kto_losses(policy.logps, ref, policy.labels, run.rl_beta, kl,
                              run.kto_desirable_weight, run.kto_undesirable_weight).sum()
        c, r = pair_indices(policy.labels)
        if run.rl == "orpo":
            mean = policy.mean()
            return (-mean[c] - run.orpo_alpha * orpo_odds_ratio(mean[c], mean[r])).sum()
        if run.dpo_loss_type == "ipo":
            return ipo_losses(policy.logps[c], policy.logps[r], ref[c], ref[r], run.rl_beta,
                              policy.tokens[c], policy.tokens[r]).sum()
        return dpo_losses(policy.logps[c], policy.logps[r], ref[c], ref[r], run.rl_beta,
                          run.dpo_label_smoothing).sum()


def frozen_reference(start: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A full fine-tune's reference model: a copy of the policy as training starts (as TRL's
    ``create_reference_model``), frozen, its parameters in the policy's compute dtype (buffers such as
    the rotary frequencies keep theirs), made one parameter at a time on ``device``: no second fp32 copy."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copies = {id(p): torch.nn.Parameter(p.detach().to(device, dtype, copy=True), requires_grad=False)
              for p in start.parameters()}  # deepcopy takes these for the parameters (tied ones stay tied)
    return copy.deepcopy(start, memo=copies).to(device).eval()


def preference_objective(run: RunConfig, start: torch.nn.Module, device: torch.device,
                         full: bool) -> PreferenceObjective:
    """``rl``'s objective; a full fine-tune's dpo or kto gets its frozen reference, a copy of ``start``
    (the policy as loaded, before training)."""
    objective = PreferenceObjective(run)
    if full and objective.needs_reference:
        objective.reference = frozen_reference(start, device)
    return objective


# --------------------------------------------------------------------------- input checks

def check_preference_shards(split_dir: Path, objective: str, special_ids: set[int]) -> None:
    """Stop with an error naming the shard and row of the first unusable pair or sample.

    A response is empty when none of its trained tokens is an ordinary token (an end-of-turn
    alone teaches no preference); a dpo pair is useless when chosen and rejected responses are
    the same tokens (its DPO gradient is zero, its ORPO term constant).
    """
    import pyarrow as pa

    special = np.asarray(sorted(special_ids), np.int64)
    for path in sorted(Path(split_dir).glob("shard-*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        if "segment_labels" not in table.column_names:
            raise PreferenceDataError(f"{path}: no segment_labels column: rl needs shards tokenized from "
                                      f"type: {objective} data")
        labels_col, cu_col = table.column("labels"), table.column("cu_seqlens")
        for r in range(table.num_rows):
            labels = labels_col[r].values.to_numpy()
            cu = cu_col[r].values.to_numpy()
            responses = []
            for k, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
                resp = labels[a:b][labels[a:b] != IGNORE_INDEX]
                if not np.isin(resp, special).sum() < len(resp):
                    what = f"pair {k // 2} ({'chosen' if k % 2 == 0 else 'rejected'})" if objective == "dpo" \
                        else f"sample {k}"
                    raise PreferenceDataError(f"{path}: row {r}, {what}: the response is empty")
                responses.append(resp)
            if objective == "dpo":
                for k in range(0, len(responses) - 1, 2):
                    if np.array_equal(responses[k], responses[k + 1]):
                        raise PreferenceDataError(f"{path}: row {r}, pair {k // 2}: chosen and rejected responses "
                                                  "are identical")
