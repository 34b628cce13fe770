"""The one training loop: a single process and every rank of a job run it, on every engine
(:mod:`tunedag.train.engines`). Warmup + schedule, gradient accumulation, metrics, checkpoints
and exact resume live here; engines differ only in how they compute, reduce and store.

The loss of an optimizer step is the mean over every trained token of its micro-batches
(summed per micro-batch, divided by the step's token count), so accumulation over k
micro-batches equals one batch k times larger. On W ranks:

- rank r reads rows r, r+W, r+2W... of each epoch's seeded order (``ShardReader(rank, W)``), so a
  step's rows across ranks are the rows one process would take for a batch W times larger;
- the step's trained-token count (with ``rl``: its pair or sample count) is summed over ranks,
  every rank divides its summed loss by that global count, and the engine sums gradients across
  ranks, so the loss is the true mean over the step (KTO's reference point is each rank's
  micro-batch mean, as it is each micro-batch's in one process);
- rank 0 alone writes metrics and outputs; checkpoints and the final adapter are collective.

With ``eval_steps`` or ``evals_per_epoch`` the loop also computes the held-out loss on the val shards
(every rank its share, :mod:`tunedag.train.held_out`) at those steps and at the last, logs it as
``eval_loss`` beside the step's train loss, and with ``early_stopping_patience`` stops every rank
together once it stops improving; the run's adapter is then its best evaluation's.

Every rank of a job joins a failure board (:mod:`tunedag.train.rank_failures`): when one rank
fails, the others stop within seconds instead of waiting in a collective until the time limit.
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

from tunedag.config import RunConfig
from tunedag.data.batches import collate, trained_token_count
from tunedag.data.shards import ShardReader, verify_shards
from tunedag.errors import TunedagError
from tunedag.io import atomic_path, write_json
from tunedag.models.qat import fake_quant_due, set_fake_quant
from tunedag.train import checkpoint as ckpt
from tunedag.train.engines import make_engine
from tunedag.train.held_out import Evaluation, HeldOutRows, best_dir, eval_interval, prune_best, was_stopped_early
from tunedag.train.metrics_log import MetricsLog
from tunedag.train.preference import REFERENCE_LOGPS, check_preference_shards
from tunedag.train.reference_table import ReferenceTable, reference_table
from tunedag.train.rank_failures import rank_session
from tunedag.train.ranks import DistEnv, all_sum, any_rank, broadcast, choose_device
from tunedag.train.schedule import build_scheduler
from tunedag.train.sparsity import KeptSparsity

log = logging.getLogger(__name__)
SHARD_OBJECTIVE = {None: "sft", "kto": "kto", "prm": "prm"}  # what the shards of each rl hold; the others: dpo pairs


class TrainError(TunedagError, ValueError):
    """The shards and the run's objective do not fit together."""


def check_objective(run: RunConfig, shards_dir: Path, manifest: dict[str, Any]) -> None:
    """Stop unless the shards hold what ``run.rl`` trains on (before any model is loaded)."""
    objective = manifest.get("objective", "sft")
    if objective != SHARD_OBJECTIVE.get(run.rl, "dpo"):
        raise TrainError(f"{shards_dir}: shards of objective {objective!r} cannot train rl: {run.rl} "
                         "(rl: dpo, orpo and reward need type: dpo data, kto type: kto, prm type: stepwise_supervised, "
                         "null supervised data)")


def loss_units(run: RunConfig, shards_dir: Path, manifest: dict[str, Any], model_config: Any,
               objective: Any) -> Callable[[dict[str, torch.Tensor]], int]:
    """What a step's summed loss is divided by, per micro-batch: trained tokens, or with ``rl`` the
    objective's pairs or samples (after checking every pair or sample is usable)."""
    if run.rl is None:
        return lambda batch: trained_token_count(batch["labels"])
    if run.rl != "prm":  # prm counts labelled step tokens: no pairs or samples to check
        check_preference_shards(shards_dir / "train", manifest["objective"],
                                {model_config.eos_token_id, manifest.get("eos_token_id", manifest["pad_token_id"]),
                                 manifest["pad_token_id"]})
    return objective.loss_units


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(reader: ShardReader, run: RunConfig, pad_id: int, position: ckpt.Position,
                  reference: ReferenceTable | None = None) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
    """(batch, epoch, offset after it) from ``position`` on; endless when max_steps is set, unless this rank
    has no rows at all (fewer rows than ranks): then none, instead of cycling empty epochs forever. With a
    ``reference`` table (precompute_ref_log_probs) each batch carries its rows' reference log-probs."""
    epoch, offset = position.epoch, position.offset
    while (run.max_steps is not None and len(reader) > 0) or epoch < run.num_epochs:
        order = reader.epoch_order(epoch, run.seed, shuffle=not run.curriculum_sampling)
        while offset < len(order):
            indices = [int(i) for i in order[offset: offset + run.micro_batch_size]]
            batch = collate([reader.row(i) for i in indices], pad_id)
            if reference is not None:
                batch[REFERENCE_LOGPS] = reference.for_rows(indices)
            offset += len(indices)
            yield batch, epoch, offset
        epoch, offset = epoch + 1, 0


def steps_per_epoch(run: RunConfig, rows: int) -> int:
    return math.ceil(math.ceil(rows / run.micro_batch_size) / run.gradient_accumulation_steps)


def total_steps(run: RunConfig, rows: int) -> int:
    if run.max_steps is not None:
        return run.max_steps
    return steps_per_epoch(run, rows) * run.num_epochs


def warmup_steps(run: RunConfig, steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of all steps (rounded down, as Axolotl does)."""
    return int(run.warmup_ratio * steps) if run.warmup_ratio is not None else run.warmup_steps


def save_interval(run: RunConfig, rows: int) -> int:
    """Optimizer steps between checkpoints: ``save_steps``, or an epoch over ``saves_per_epoch``."""
    if run.saves_per_epoch is not None:
        return max(1, steps_per_epoch(run, rows) // run.saves_per_epoch)
    return run.save_steps


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in lines))


def _resume_point(ckpt_root: Path, key: str, steps: int, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest complete checkpoint written with resume key ``key`` (removing stale and
    broken ones, or the whole folder when none is left); every rank gets its path. A finished run's
    last checkpoint is not resumed, nor that of a run stopped early: running the stage again
    (``--forcerun train``) trains again."""
    found = None
    if env.is_main:
        found = ckpt.latest_checkpoint(ckpt_root, key, steps)
        if found is not None and was_stopped_early(ckpt.load_state(found)):
            log.info("%s is the end of a run stopped early: training again from step 0", found)
            found = None
        if found is None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
    found = broadcast(str(found) if found else None)
    return Path(found) if found else None


def train(run: RunConfig, shards_dir: Path, model_path: Path, run_dir: Path, env: DistEnv = DistEnv(),
          should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Train ``run`` on the packed shards as rank ``env.rank`` of ``env.world_size``; rank 0 writes
    run_dir/adapter, train_metrics.jsonl and train_info.json. Returns train_info (every rank), or None
    when ``should_stop`` (polled after every optimizer step: a pre-timeout or preemption signal) asked
    to stop: then every rank has written a complete checkpoint at that step."""
    device = choose_device(env)  # before any collective
    group = env.world_size > 1 or run.train_engine == "deepspeed"
    with rank_session(run_dir, env, device, group):
        return _train(run, shards_dir, model_path, run_dir, env, should_stop)


def _evaluation(run: RunConfig, shards_dir: Path, manifest: dict[str, Any], env: DistEnv, rows: int,
                steps: int, run_dir: Path) -> Evaluation:
    """The run's held-out evaluation (its val shards checked and opened only when it has a schedule)."""
    interval = eval_interval(run.eval_steps, run.evals_per_epoch, steps_per_epoch(run, rows))
    held_out = None
    if interval is not None:
        verify_shards(shards_dir / "val", manifest)
        held_out = HeldOutRows(shards_dir / "val", env, run.eval_batch_size or run.micro_batch_size,
                               manifest["pad_token_id"])
    return Evaluation(interval, held_out, run.early_stopping_patience, steps, run_dir / "checkpoints")


def _train(run: RunConfig, shards_dir: Path, model_path: Path, run_dir: Path, env: DistEnv,
           should_stop: Callable[[], bool]) -> dict[str, Any] | None:
    config_hash = run.stage_hash("train")
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    verify_shards(shards_dir / "train", manifest)  # a changed shard stops here, naming it and the fix
    check_objective(run, shards_dir, manifest)
    reader = ShardReader(shards_dir / "train", env.rank, env.world_size)
    steps, save_every = total_steps(run, len(reader)), save_interval(run, len(reader))
    evaluation = _evaluation(run, shards_dir, manifest, env, len(reader), steps, run_dir)
    key = ckpt.resume_key(config_hash, manifest, model_path)
    ckpt_root = run_dir / "checkpoints"
    resumed = _resume_point(ckpt_root, key, steps, env)
    seed_everything(run.seed)
    engine = make_engine(run, model_path, env)
    sparsity = KeptSparsity(engine.model.named_parameters(), run.keep_sparsity)  # the base's, before a resume
    count = loss_units(run, shards_dir, manifest, engine.model.config, engine.objective)
    scheduler = build_scheduler(engine.optimizer, run.lr_scheduler, warmup_steps(run, steps), steps,
                                run.cosine_min_lr_ratio, run.cosine_constant_lr_ratio)
    position = ckpt.Position()
    if resumed is not None:
        state = ckpt.load_state(resumed)
        engine.load_payload(resumed)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])  # ranks consume randomness alike: rank 0's state is everyone's
        position = ckpt.Position(**state["position"])
        evaluation.stopping.load(state.get("early_stopping", {}))
        log.info("resuming from %s (step %d of %d)", resumed, position.step, steps)
    live_metrics = ckpt_root / "metrics.jsonl"
    metrics = None
    if env.is_main:
        _truncate_metrics(live_metrics, position.step)
        for name, content in engine.run_files.items():
            write_json(run_dir / name, content)
        metrics = MetricsLog(run, run_dir, live_metrics, steps, position.step)

    reference = None
    if run.precompute_ref_log_probs:  # after the resume point: a run started afresh clears ckpt_root first
        reference = reference_table(engine, reader, run.micro_batch_size, manifest["pad_token_id"],
                                    ckpt_root / f"reference_logps.rank{env.rank}.npz", key)
    batches = micro_batches(reader, run, manifest["pad_token_id"], position, reference)
    started, tokens_at_start = time.perf_counter(), position.tokens_seen
    last_loss = float("nan")
    fake_quant_on = None
    try:
        while position.step < steps:
            if run.qat is not None:  # Axolotl's fake_quant_after_n_steps: plain linears until then
                due = fake_quant_due(position.step, run.qat.fake_quant_after_n_steps)
                if due != fake_quant_on:  # set on the first step (after a resume too), then once when it turns
                    set_fake_quant(engine.model, due)
                    fake_quant_on = due
            group = [b for _, b in zip(range(run.gradient_accumulation_steps), batches)]
            if not any_rank(bool(group), engine.device):
                break
            n_units = all_sum(sum(count(batch) for batch, _, _ in group), engine.device)  # tokens, or pairs/samples
            loss_total = 0.0
            for batch, _, _ in group:
                loss = engine.loss_sum(batch) / max(n_units, 1)
                engine.backward(loss)
                loss_total += loss.item()
            loss_total = all_sum(loss_total, engine.device)
            sparsity.mask_gradients()
            grad_norm = engine.step(run.max_grad_norm)
            sparsity.mask_weights()
            scheduler.step()
            _, position.epoch, position.offset = group[-1]
            position.step += 1
            position.tokens_seen += int(all_sum(sum(int(b["input_ids"].numel()) for b, _, _ in group), engine.device))
            last_loss = loss_total
            evaluated = evaluation.after_step(position.step, engine, count)  # held-out loss where due
            if metrics and (position.step % run.logging_steps == 0 or position.step == steps or evaluated):
                elapsed = time.perf_counter() - started
                training_s = max(elapsed - evaluation.seconds, 1e-9)
                record = {"step": position.step, "epoch": position.epoch, "loss": round(loss_total, 6),
                          "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "trained_tokens": int(n_units), "tokens_seen": position.tokens_seen,
                          "tokens_per_s": round((position.tokens_seen - tokens_at_start) / training_s, 1),
                          "elapsed_s": round(elapsed, 3), "world_size": env.world_size, **evaluated}
                if engine.device.type == "cuda":
                    record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 3)
                metrics.log(record)
            early = evaluation.stopping.stopped
            stopped = any_rank(should_stop(), engine.device) and position.step < steps and not early
            if stopped or early or position.step % save_every == 0 or position.step == steps:
                _checkpoint(ckpt_root, key, position, env, engine, scheduler, evaluation, run.keep_last_checkpoints)
            if stopped:
                log.warning("rank %d: stopping at step %d after a complete checkpoint", env.rank, position.step)
                return None
            if early:
                break
    finally:
        if metrics:
            metrics.close()

    adapter_step = _save_final_adapter(engine, evaluation, ckpt_root, run_dir, env, position.step)
    info = {"config_hash": config_hash, "engine": engine.name, **engine.info, "device": str(engine.device),
            "world_size": env.world_size, "steps": position.step, "tokens_seen": position.tokens_seen,
            "final_loss": last_loss, "resumed_from": str(resumed) if resumed else None,
            "position": asdict(position), "shards_config_hash": manifest["config_hash"],
            **evaluation.info(), "adapter_step": adapter_step}
    if env.is_main:
        with atomic_path(run_dir / "train_metrics.jsonl") as tmp:
            shutil.copyfile(live_metrics, tmp)
        write_json(run_dir / "train_info.json", info)
    return info


def _checkpoint(ckpt_root: Path, key: str, position: ckpt.Position, env: DistEnv, engine: Any, scheduler: Any,
                evaluation: Evaluation, keep_last: int) -> None:
    """Collective: checkpoint ``position.step`` with the loop's trainer state."""
    trainer_state = {"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "position": asdict(position),
                     "resume_key": key, "engine": engine.name, "world_size": env.world_size,
                     "early_stopping": evaluation.stopping.state()}
    ckpt.write_checkpoint(ckpt_root, position.step, env, engine.write_payload, trainer_state, keep_last)
    if env.is_main and evaluation.keeps_best:
        prune_best(ckpt_root, evaluation.stopping.best_step)


def _save_final_adapter(engine: Any, evaluation: Evaluation, ckpt_root: Path, run_dir: Path, env: DistEnv,
                        step: int) -> int:
    """run_dir/adapter: the best evaluation's with early stopping (its saved copy), else this step's
    (collective). Returns the step the adapter's weights are from."""
    best = evaluation.stopping.best_step
    if not evaluation.keeps_best or best is None:  # no patience, or no finite held-out loss at all
        engine.save_adapter(run_dir / "adapter")
        return step
    if env.is_main:
        with atomic_path(run_dir / "adapter") as tmp:
            shutil.copytree(best_dir(ckpt_root, best), tmp)
    return best
