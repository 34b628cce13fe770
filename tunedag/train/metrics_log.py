"""Where per-step training metrics go: a JSONL file, Weights & Biases, and progress output.

The JSONL file (one object per logged step) is the record the report reads. W&B runs when the
run sets ``wandb_project``, offline by default because compute nodes have no internet
(``wandb sync runs/<run>/wandb/offline-run-*`` uploads later from the login node); the API key
is read by wandb from the environment only and never passed or written by tunedag. Progress is a
tqdm bar on a terminal and, in Slurm log files (no TTY), one plain line per logged step with
step, loss, tokens/s and ETA. A step with a held-out evaluation also carries ``eval_loss`` and
``eval_tokens`` (its trained tokens, or with ``rl`` pairs or samples), in the file, in W&B and on
the progress line.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tunedag.config import RunConfig

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLog:
    """Append metric records for steps ``start_step + 1 .. total_steps``."""

    def __init__(self, run: RunConfig, run_dir: Path, jsonl: Path, total_steps: int, start_step: int,
                 stream: TextIO | None = None):
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
        self.file = open(jsonl, "a")
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step")
        self.wandb_run = None
        if run.wandb_project and run.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=run.wandb_project, entity=run.wandb_entity, name=run.wandb_name or run_dir.name,
                tags=list(run.wandb_tags), mode=run.wandb_mode, dir=str(run_dir), resume="allow",
                id=f"{run_dir.name}-{run.stage_hash('train')[:8]}", config=run.stage_slice("train"))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            extra = {"eval_loss": f"{record['eval_loss']:.4f}"} if "eval_loss" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra)
            return
        done = record["step"] - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total_steps - record["step"]) if done else 0.0
        held_out = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
        print(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f}{held_out} "
              f"lr {record['learning_rate']:.3g} tokens/s {record['tokens_per_s']:.0f} "
              f"eta {format_eta(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
