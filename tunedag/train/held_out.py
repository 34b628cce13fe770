"""The held-out loss during training (``eval_steps`` / ``evals_per_epoch``) and early stopping on it
(``early_stopping_patience``).

The loss is the training objective's on the val shards tokenize wrote: the engine's own ``loss_sum``
under ``torch.no_grad`` with the model in eval mode (no dropout), summed over every val row and
divided by their trained-token count (with ``rl``: pairs or samples), so it is the mean the train
loss would be over those rows. On W ranks rank r takes rows r, r+W, …, and the sums are added over
ranks, so the value does not depend on the rank count beyond fp32 summation order (except KTO,
whose reference point is each micro-batch's mean). Every rank runs the same number of forward
passes, because FSDP and ZeRO-3 gather weights inside forward (a collective): a rank whose share
is a row short computes one of its batches again and drops the result.

Early stopping: an evaluation improves when its loss is below the best so far (strictly; NaN never
does); after ``early_stopping_patience`` evaluations in a row without improvement every rank stops
at that step (they all hold the same summed loss, so they decide alike). With patience set, each
improvement saves the adapter to ``checkpoints/best-step-N/`` and the run's final adapter is the
best evaluation's, not the last step's (Hugging Face's ``load_best_model_at_end``). The state
(best loss, its step, evaluations since) travels in every checkpoint's trainer state, so a resumed
run stops where an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunedag.data.batches import collate
from tunedag.data.shards import ShardReader
from tunedag.errors import TunedagError
from tunedag.train import checkpoint as ckpt
from tunedag.train.ranks import DistEnv, all_sum

log = logging.getLogger(__name__)
BEST_PREFIX = "best-step-"


class HeldOutError(TunedagError, ValueError):
    """Evaluation during training cannot run on these shards."""


def eval_interval(eval_steps: int | None, evals_per_epoch: int | None, steps_per_epoch: int) -> int | None:
    """Optimizer steps between evaluations (None: no evaluation). ``evals_per_epoch`` n means every
    ``steps_per_epoch // n`` steps (at least 1), as Axolotl turns it into ``eval_steps``."""
    if eval_steps is not None:
        return eval_steps
    if evals_per_epoch is not None:
        return max(1, steps_per_epoch // evals_per_epoch)
    return None


class HeldOutRows:
    """This rank's share of the val rows, in fixed batches."""

    def __init__(self, val_dir: Path, env: DistEnv, batch_size: int, pad_id: int):
        self.reader = ShardReader(val_dir)
        total = self.reader.num_rows
        if total == 0:
            raise HeldOutError(f"{val_dir}: the val split holds no rows, so eval_steps / evals_per_epoch have "
                               "nothing to evaluate; raise val_set_size and rerun tokenize")
        self.mine = list(range(env.rank, total, env.world_size))
        self.batch_size, self.pad_id = batch_size, pad_id
        self.batches = math.ceil(math.ceil(total / env.world_size) / batch_size)  # every rank alike

    @torch.no_grad()
    def loss(self, engine: Any, count: Callable[[dict[str, torch.Tensor]], int]) -> tuple[float, int]:
        """(mean loss over every rank's val rows, their trained tokens / pairs / samples); collective."""
        model = engine.model
        was_training = model.training
        model.eval()
        total, units = 0.0, 0
        try:
            for b in range(self.batches):
                rows = self.mine[b * self.batch_size: (b + 1) * self.batch_size]
                batch = collate([self.reader.row(i) for i in rows or self.mine[:self.batch_size] or [0]], self.pad_id)
                loss = float(engine.loss_sum(batch))  # a forward on every rank, even when dropped
                if rows:
                    total, units = total + loss, units + count(batch)
        finally:
            model.train(was_training)
        units_all = all_sum(units, engine.device)
        return all_sum(total, engine.device) / max(units_all, 1), int(units_all)


@dataclass
class EarlyStopping:
    """The best held-out loss so far, its step and the evaluations since; ``patience`` None: never stop."""

    patience: int | None = None
    best_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped: bool = False

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if not math.isnan(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            return True
        self.evals_since_best += 1
        self.stopped = self.patience is not None and self.evals_since_best >= self.patience
        return False

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def was_stopped_early(trainer_state: dict[str, Any]) -> bool:
    """Whether a checkpoint is the end of a run that stopped early (a finished run: never resumed)."""
    return bool(trainer_state.get("early_stopping", {}).get("stopped"))


class Evaluation:
    """One run's evaluation schedule, held-out rows and early-stopping state; with patience, its best
    adapters go to ``ckpt_root/best-step-N``."""

    def __init__(self, interval: int | None, rows: HeldOutRows | None, patience: int | None, last_step: int,
                 ckpt_root: Path | None = None):
        self.interval, self.rows, self.last_step, self.ckpt_root = interval, rows, last_step, ckpt_root
        self.stopping = EarlyStopping(patience)
        self.seconds = 0.0  # spent evaluating: left out of the training throughput

    @property
    def keeps_best(self) -> bool:
        return self.stopping.patience is not None

    def due(self, step: int) -> bool:
        return self.interval is not None and (step % self.interval == 0 or step == self.last_step)

    def after_step(self, step: int, engine: Any, count: Callable[[dict[str, torch.Tensor]], int]) -> dict[str, Any]:
        """Where ``step`` is due (collective): evaluate, update the early-stopping state, save a new best
        adapter; the metric fields (none where not due)."""
        if not self.due(step):
            return {}
        started = time.perf_counter()
        loss, units = self.rows.loss(engine, count)
        if self.stopping.update(step, loss) and self.keeps_best:
            engine.save_adapter(best_dir(self.ckpt_root, step))  # collective
        if self.stopping.stopped:
            log.info("early stopping at step %d: %d evaluations without a held-out loss below %.6g (step %d)",
                     step, self.stopping.evals_since_best, self.stopping.best_loss, self.stopping.best_step)
        self.seconds += time.perf_counter() - started
        return {"eval_loss": round(loss, 6), "eval_tokens": units}

    def info(self) -> dict[str, Any]:
        """What train_info.json records."""
        s = self.stopping
        return {"stopped_early": s.stopped, "best_eval_loss": s.best_loss, "best_eval_step": s.best_step,
                "evals_since_best": s.evals_since_best}


def best_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"{BEST_PREFIX}{step}"


def prune_best(ckpt_root: Path, current_best: int | None) -> None:
    """Remove the best-step folders neither the run's current best nor any kept checkpoint refers to
    (an older checkpoint resumed after a newer one broke still finds its best adapter)."""
    keep = {current_best} | {ckpt.load_state(p).get("early_stopping", {}).get("best_step")
                             for p in ckpt.list_checkpoints(ckpt_root)}
    for folder in ckpt_root.glob(f"{BEST_PREFIX}*"):
        step = folder.name[len(BEST_PREFIX):]
        if not step.isdigit() or int(step) not in keep:
            shutil.rmtree(folder, ignore_errors=True)
