"""The learning-rate schedule of a run: linear warmup from 0, then ``lr_scheduler``'s decay.

The schedule is a factor of the peak ``learning_rate`` for each optimizer step ``s`` of ``N``
(``W`` of them warmup); every parameter group's ``lr`` is its own peak times the factor:

- warmup, ``s < W``: ``s / W``;
- ``constant``: 1;
- ``linear``: ``(N - s) / (N - W)``, reaching 0 at the last step;
- ``cosine``: ``r + (1 - r) * (1 + cos(pi * (min(s, E) - W) / (E - W))) / 2`` with the floor
  ``r = cosine_min_lr_ratio`` (0 when unset) and the cosine's end ``E = int(N * cosine_constant_lr_ratio)``
  (``N`` when unset or 0): the cosine falls from the peak to ``r`` times it at step ``E`` and stays there.

These are Axolotl's curves (its cosine with a minimum lr, and its cosine that decays to the minimum
and then holds it, after "Continual Pre-Training of Large Language Models", arXiv:2308.04014), and
with ``r = 0`` and ``E = N`` the cosine and the others are transformers' own.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunedag.errors import TunedagError

SCHEDULES = ("cosine", "linear", "constant")


class ScheduleError(TunedagError, ValueError):
    """The schedule's settings do not fit the run's number of steps."""


def lr_factor(step: int, *, schedule: str, warmup: int, steps: int, min_lr_ratio: float = 0.0,
              cosine_end: int | None = None) -> float:
    """The factor of the peak learning rate at optimizer step ``step`` (0-based) of ``steps``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (steps - step) / max(1, steps - warmup))
    end = steps if cosine_end is None else cosine_end
    progress = (min(step, end) - warmup) / max(1, end - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_end(steps: int, warmup: int, constant_lr_ratio: float | None) -> int | None:
    """The step where the cosine reaches its floor (``None``: the last), checked against the warmup."""
    if not constant_lr_ratio:
        return None
    end = int(steps * constant_lr_ratio)
    if end <= warmup:
        raise ScheduleError(f"cosine_constant_lr_ratio: {constant_lr_ratio} of {steps} steps ends the cosine at "
                            f"step {end}, not after the warmup's {warmup} steps; raise it, or shorten the warmup")
    return end


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, steps: int,
                    min_lr_ratio: float | None = None, constant_lr_ratio: float | None = None) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following :func:`lr_factor` (its state dict holds the step only,
    so a checkpoint resumes it)."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"lr_scheduler: unknown schedule {schedule!r}; tunedag has {', '.join(SCHEDULES)}")
    factor = partial(lr_factor, schedule=schedule, warmup=warmup, steps=steps, min_lr_ratio=min_lr_ratio or 0.0,
                     cosine_end=cosine_end(steps, warmup, constant_lr_ratio) if schedule == "cosine" else None)
    return LambdaLR(optimizer, factor)
