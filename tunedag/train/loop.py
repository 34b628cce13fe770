"""The training loop shared by all engines: AdamW, warmup + schedule, gradient accumulation,
checkpoints and exact resume.

The loss of an optimizer step is the mean over every trained token of its micro-batches
(summed per micro-batch, divided by the group's token count), so accumulation over k
micro-batches equals one batch k times larger.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import get_scheduler

from tunedag.config import RunConfig
from tunedag.data.shards import ShardReader
from tunedag.errors import TunedagError
from tunedag.io import atomic_path, write_json
from tunedag.train import checkpoint as ckpt
from tunedag.data.batches import collate, trained_token_count
from tunedag.train.engines import make_engine
from tunedag.train.metrics_log import MetricsLog
from tunedag.train.preference import check_preference_shards

log = logging.getLogger(__name__)
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
SHARD_OBJECTIVE = {None: "sft", "kto": "kto"}  # what the shards of each rl hold; the other objectives: dpo pairs


class TrainError(TunedagError, ValueError):
    """The shards and the run's objective do not fit together."""


def check_objective(run: RunConfig, shards_dir: Path, manifest: dict[str, Any]) -> None:
    """Stop unless the shards hold what ``run.rl`` trains on (before any model is loaded)."""
    objective = manifest.get("objective", "sft")
    if objective != SHARD_OBJECTIVE.get(run.rl, "dpo"):
        raise TrainError(f"{shards_dir}: shards of objective {objective!r} cannot train rl: {run.rl} "
                         "(rl: dpo, orpo and reward need type: dpo data, kto type: kto, null supervised data)")


def loss_units(run: RunConfig, shards_dir: Path, manifest: dict[str, Any], model_config: Any,
               objective: Any) -> Callable[[dict[str, torch.Tensor]], int]:
    """What a step's summed loss is divided by, per micro-batch: trained tokens, or with ``rl`` the
    objective's pairs or samples (after checking every pair or sample is usable)."""
    if run.rl is None:
        return lambda batch: trained_token_count(batch["labels"])
    check_preference_shards(shards_dir / "train", manifest["objective"],
                            {model_config.eos_token_id, manifest["pad_token_id"]})
    return objective.loss_units


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(reader: ShardReader, run: RunConfig, pad_id: int,
                  position: ckpt.Position) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
    """(batch, epoch, offset after it) from ``position`` on; endless when max_steps is set."""
    epoch, offset = position.epoch, position.offset
    while run.max_steps is not None or epoch < run.num_epochs:
        order = reader.epoch_order(epoch, run.seed)
        while offset < len(order):
            rows = [reader.row(i) for i in order[offset: offset + run.micro_batch_size]]
            offset += len(rows)
            yield collate(rows, pad_id), epoch, offset
        epoch, offset = epoch + 1, 0


def total_steps(run: RunConfig, rows: int) -> int:
    if run.max_steps is not None:
        return run.max_steps
    per_epoch = math.ceil(math.ceil(rows / run.micro_batch_size) / run.gradient_accumulation_steps)
    return per_epoch * run.num_epochs


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in lines))


def train(run: RunConfig, shards_dir: Path, model_path: Path, run_dir: Path) -> dict[str, Any]:
    """Train ``run`` on the packed shards; write run_dir/adapter, train_metrics.jsonl, train_info.json."""
    config_hash = run.stage_hash("train")
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    seed_everything(run.seed)
    check_objective(run, shards_dir, manifest)
    engine = make_engine(run, model_path)
    count = loss_units(run, shards_dir, manifest, engine.model.config, engine.objective)
    reader = ShardReader(shards_dir / "train")
    steps = total_steps(run, len(reader))
    params = engine.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay,
                                  fused=engine.device.type == "cuda")
    scheduler = get_scheduler(SCHEDULERS[run.lr_scheduler], optimizer,
                              num_warmup_steps=run.warmup_steps, num_training_steps=steps)
    ckpt_root = run_dir / "checkpoints"
    live_metrics = ckpt_root / "metrics.jsonl"
    position = ckpt.Position()
    resumed = ckpt.latest_checkpoint(ckpt_root, config_hash)
    if resumed is not None:
        state = ckpt.load_state(resumed)
        engine.load_trainable(resumed)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        position = ckpt.Position(**state["position"])
        log.info("resuming from %s (step %d of %d)", resumed, position.step, steps)
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(live_metrics, position.step)

    batches = micro_batches(reader, run, manifest["pad_token_id"], position)
    started, tokens_at_start = time.perf_counter(), position.tokens_seen
    last_loss = float("nan")
    metrics = MetricsLog(run, run_dir, live_metrics, steps, position.step)
    try:
        while position.step < steps:
            group = [b for _, b in zip(range(run.gradient_accumulation_steps), batches)]
            if not group:
                break
            n_tokens = sum(count(batch) for batch, _, _ in group)  # trained tokens, or pairs/samples for rl
            loss_total = 0.0
            for batch, _, _ in group:
                loss = engine.loss_sum(batch) / max(n_tokens, 1)
                loss.backward()
                loss_total += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _, position.epoch, position.offset = group[-1]
            position.step += 1
            position.tokens_seen += sum(int(b["input_ids"].numel()) for b, _, _ in group)
            last_loss = loss_total
            if position.step % run.logging_steps == 0 or position.step == steps:
                elapsed = time.perf_counter() - started
                record = {"step": position.step, "epoch": position.epoch, "loss": round(loss_total, 6),
                          "learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "trained_tokens": n_tokens, "tokens_seen": position.tokens_seen,
                          "tokens_per_s": round((position.tokens_seen - tokens_at_start) / max(elapsed, 1e-9), 1)}
                if engine.device.type == "cuda":
                    record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 3)
                metrics.log(record)
            if position.step % run.save_steps == 0 or position.step == steps:
                ckpt.save_checkpoint(ckpt_root, engine.model, optimizer, scheduler, position, config_hash,
                                     run.keep_last_checkpoints)
    finally:
        metrics.close()

    with atomic_path(run_dir / "adapter") as tmp:
        engine.save(tmp)
    with atomic_path(run_dir / "train_metrics.jsonl") as tmp:
        shutil.copyfile(live_metrics, tmp)
    info = {"config_hash": config_hash, "engine": engine.name, "device": str(engine.device),
            "steps": position.step, "tokens_seen": position.tokens_seen, "final_loss": last_loss,
            "resumed_from": str(resumed) if resumed else None, "position": asdict(position),
            "shards_config_hash": manifest["config_hash"]}
    write_json(run_dir / "train_info.json", info)
    return info
