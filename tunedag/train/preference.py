"""Preference objectives (``rl: dpo | orpo | kto``) on the packed preference shards.

A dpo row holds pairs as adjacent segments, chosen then rejected (``segment_labels`` 1, 0, …),
each with its prompt masked; a kto row holds single samples labelled 1 (desirable) or 0. A
sequence's log-probability is the sum of its response tokens' log-probs, read from the same
packed forward pass as supervised training: chosen and rejected go through the model in one
batch, and the packed mask keeps them from seeing each other.

Memory: the [tokens, vocab] logits are never materialised. Only the trained positions' hidden
states are kept, and the LM head + log-softmax run over ``chunk_tokens`` of them at a time under
activation checkpointing, so forward and backward hold one [chunk, vocab] block at once (the
idea of the fused linear cross-entropy).

Reference model: with LoRA it is the same model with its adapters (and modules_to_save)
disabled through peft's ``disable_adapter()``: no second copy in memory, one extra forward pass
without gradients (the triton engine's fused modules honour it and run the frozen base alone).
Engines hand their final hidden states and LM head to ``hidden_logps`` and the result to
``PreferenceObjective.loss_from_logps``; ``loss_sum`` does both for an HF model.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunedag.config import RunConfig
from tunedag.data.formats import IGNORE_INDEX
from tunedag.errors import TunedagError
from tunedag.train.batching import model_inputs

CHUNK_TOKENS = 1024


class PreferenceDataError(TunedagError, ValueError):
    """A preference pair or sample the objective cannot learn from; names the shard and row."""


# --------------------------------------------------------------------------- log-probs

@dataclass
class SequenceLogps:
    """Per-segment sums of response-token log-probs, in batch order (row by row, segment by segment)."""

    logps: torch.Tensor  # (S,) float32
    tokens: torch.Tensor  # (S,) response tokens per segment
    labels: torch.Tensor  # (S,) segment label: 1 chosen/desirable, 0 rejected/undesirable

    def mean(self) -> torch.Tensor:
        return self.logps / self.tokens.clamp(min=1)


def _chunk_logps(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module,
                 softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V): the only vocab-sized block alive
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, target[:, None])[:, 0] - torch.logsumexp(logits, -1)


def token_logps(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module,
                chunk_tokens: int = CHUNK_TOKENS, softcap: float | None = None) -> torch.Tensor:
    """log p(target | hidden) for (N, H) hidden states, ``chunk_tokens`` rows of logits at a time.

    Each chunk runs under checkpointing, so its logits are recomputed in backward rather than
    kept: peak extra memory is one (chunk_tokens, vocab) fp32 block, e.g. 1024 × 128256 × 4 B =
    0.5 GB for Llama 3, instead of N × vocab for the whole batch.
    """
    out = []
    for a in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[a:a + chunk_tokens], target[a:a + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logps, h, t, head, softcap, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, t, head, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def segment_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) global segment number of every position (-1 on padding), and the segment labels (S,)."""
    seg = batch["segment_ids"]  # (B, T), 1.. per row, 0 = padding
    per_row = seg.max(dim=1).values  # (B,)
    offsets = torch.cumsum(per_row, 0) - per_row
    index = torch.where(seg > 0, seg - 1 + offsets[:, None], torch.full_like(seg, -1))
    labels = batch["segment_labels"]  # (B, max segments), -1 padded
    seg_labels = torch.cat([labels[b, :int(per_row[b])] for b in range(labels.shape[0])])
    return index, seg_labels


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_logps(hidden: torch.Tensor, batch: dict[str, torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                 keep: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS,
                 softcap: float | None = None) -> SequenceLogps:
    """Response log-probs of every segment from an engine's final hidden states and its LM head.

    ``hidden``: (B·T, H) for every position of the (B, T) batch, or (N, H) for the positions that
    ``keep`` (B·T,) bool selects (an engine that drops padding). ``head`` maps (n, H) to (n, V) logits.
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
    hidden = lm.get_decoder()(**model_inputs(batch, device, torch.float32)).last_hidden_state  # (B, T, H)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return hidden_logps(hidden.reshape(-1, hidden.shape[-1]), batch, lm.get_output_embeddings(),
                        chunk_tokens=chunk_tokens, softcap=softcap)


def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                    chunk_tokens: int = CHUNK_TOKENS) -> SequenceLogps:
    """The same log-probs under the reference: ``model`` with its adapters disabled, no gradients."""
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), disable:
        return sequence_logps(model, batch, device, chunk_tokens)


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

def pair_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the chosen and rejected segments; checks the segment labels read 1, 0, 1, 0, …"""
    expected = torch.arange(labels.shape[0], device=labels.device) % 2 == 0
    if labels.shape[0] % 2 or not torch.equal(labels.bool(), expected):
        raise PreferenceDataError("dpo batch: segment labels do not read chosen, rejected, … in pairs "
                                  "(were the shards made from type: dpo data?)")
    idx = torch.arange(0, labels.shape[0], 2, device=labels.device)
    return idx, idx + 1


@dataclass
class PreferenceObjective:
    """``rl``'s loss over a packed preference batch, for an engine's ``loss_sum``."""

    run: RunConfig
    chunk_tokens: int = CHUNK_TOKENS

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: pairs (dpo, orpo) or samples (kto)."""
        segments = int((batch["segment_labels"] >= 0).sum())
        return segments if self.run.rl == "kto" else segments // 2

    @property
    def needs_reference(self) -> bool:
        """dpo (sigmoid, ipo) and kto compare with the reference model; orpo does not."""
        return self.run.rl in ("dpo", "kto")

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """The summed loss of an HF (peft) ``model``'s forward passes over ``batch``."""
        with autocast():
            policy = sequence_logps(model, batch, device, self.chunk_tokens)
            ref = reference_logps(model, batch, device, self.chunk_tokens) if self.needs_reference else None
        return self.loss_from_logps(policy, ref)

    def loss_from_logps(self, policy: SequenceLogps, ref: SequenceLogps | None) -> torch.Tensor:
        """The summed loss from the policy's and (dpo, kto) the reference's log-probs, from any engine."""
        run = self.run
        if run.rl == "kto":
            ratio = (policy.logps - ref.logps).detach()
            kl = ratio.mean().clamp(min=0)
            return kto_losses(policy.logps, ref.logps, policy.labels, run.rl_beta, kl,
                              run.kto_desirable_weight, run.kto_undesirable_weight).sum()
        c, r = pair_indices(policy.labels)
        if run.rl == "orpo":
            mean = policy.mean()
            return (-mean[c] - run.orpo_alpha * orpo_odds_ratio(mean[c], mean[r])).sum()
        if run.dpo_loss_type == "ipo":
            return ipo_losses(policy.logps[c], policy.logps[r], ref.logps[c], ref.logps[r], run.rl_beta,
                              policy.tokens[c], policy.tokens[r]).sum()
        return dpo_losses(policy.logps[c], policy.logps[r], ref.logps[c], ref.logps[r], run.rl_beta,
                          run.dpo_label_smoothing).sum()


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


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def segment_scores(val_dir: Path, pad_id: int,
                   score: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
                   rows_per_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (S,), labels (S,)) of every segment in ``val_dir``, in shard order, on the CPU.

    ``score`` maps a collated batch to its per-segment scores and labels (log-probs, rewards).
    """
    from tunedag.data.shards import ShardReader
    from tunedag.train.batching import collate

    reader = ShardReader(val_dir)
    order = reader.epoch_order(0, seed=0, shuffle=False)
    scores, labels = [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(order), rows_per_batch):
        values, segment_labels = score(collate([reader.row(i) for i in order[start:start + rows_per_batch]], pad_id))
        scores.append(values.float().cpu())
        labels.append(segment_labels.cpu())
    return torch.cat(scores), torch.cat(labels)


def _logps_and_labels(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    def score(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        seq = sequence_logps(model, batch, model.device)
        return seq.logps, seq.labels
    return score


def pair_logps(model: torch.nn.Module, val_dir: Path, pad_id: int) -> torch.Tensor:
    """(pairs, 2) summed response log-probs, chosen then rejected, of every dpo pair in ``val_dir``."""
    logps, labels = segment_scores(val_dir, pad_id, _logps_and_labels(model))
    c, r = pair_indices(labels)
    return torch.stack([logps[c], logps[r]], 1)


def sample_logps(model: torch.nn.Module, val_dir: Path, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (S,), labels (S,)) of every kto sample in ``val_dir``: 1 desirable, 0 undesirable."""
    return segment_scores(val_dir, pad_id, _logps_and_labels(model))


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor | None, beta: float) -> dict[str, float]:
    """Accuracy and margin of (pairs, 2) log-probs; with a reference, DPO's implicit rewards too.

    ``preference_accuracy``: share of pairs whose chosen response is the likelier one;
    ``reward_accuracy`` / ``reward_margin``: the same on β·(log π - log π_ref), the rewards DPO trains.
    """
    if policy.shape[0] == 0:
        return {"pairs": 0}
    margin = policy[:, 0] - policy[:, 1]
    out = {"pairs": int(policy.shape[0]), "preference_accuracy": float((margin > 0).float().mean()),
           "logp_margin": float(margin.mean())}
    if reference is not None:
        rewards = beta * (policy - reference)
        reward_margin = rewards[:, 0] - rewards[:, 1]
        out.update(reward_accuracy=float((reward_margin > 0).float().mean()),
                   reward_margin=float(reward_margin.mean()))
    return out


def kto_metrics(policy: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
                beta: float) -> dict[str, float]:
    """Mean log-probs of desirable and undesirable samples; with a reference, KTO's implicit rewards.

    ``reward_accuracy``: share of samples whose reward β·(log π - log π_ref) has the sign of their
    label (positive for desirable, negative for undesirable); ``reward_margin``: mean desirable
    reward minus mean undesirable reward (TRL's rewards/chosen - rewards/rejected).
    """
    good, bad = labels == 1, labels == 0
    out: dict[str, float] = {"desirable": int(good.sum()), "undesirable": int(bad.sum())}
    if not labels.numel():
        return out

    def mean(x: torch.Tensor, where: torch.Tensor) -> float:
        return float(x[where].mean()) if where.any() else float("nan")

    out.update(desirable_logp=mean(policy, good), undesirable_logp=mean(policy, bad))
    if reference is not None:
        rewards = beta * (policy - reference)
        right_sign = torch.where(good, rewards > 0, rewards < 0)  # a zero reward is wrong either way
        out.update(reward_accuracy=float(right_sign.float().mean()),
                   desirable_reward=mean(rewards, good), undesirable_reward=mean(rewards, bad),
                   reward_margin=mean(rewards, good) - mean(rewards, bad))
    return out
