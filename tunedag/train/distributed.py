"""Training on several ranks (GPUs or CPU processes): process group, data-parallel engines, the loop.

Ranks, world size and the master address come from the Slurm environment (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``) or, outside
Slurm, from torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``. Each rank takes the GPU of its
local rank; on CPU the backend is gloo, so the same code runs in tests.

The loop mirrors :func:`tunedag.train.loop.train` step for step, and on several ranks gives the
same losses as one process whose micro-batch is ``world_size`` times larger:

- rank r reads rows r, r+W, r+2W... of each epoch's seeded order (``ShardReader(rank, W)``), so a
  step's rows across ranks are the rows one process would take for a batch W times larger;
- the step's trained-token count (with ``rl``: its pair or sample count) is all-reduced, every
  rank divides its summed loss by that global count, and gradients are *summed* across ranks,
  so the loss is the true mean over the step (KTO's reference point is each rank's micro-batch
  mean, as it is each micro-batch's in one process; ``rl`` is refused on fsdp and ZeRO-3 by
  config validation);
- rank 0 alone writes metrics, checkpoints and outputs; gathering weights is collective.

Engines (``train_engine``) own the optimizer, ``backward`` and ``step`` (reduce, clip, update,
zero): ``ddp`` replicates the model and all-reduces the trainable gradients (LoRA: a few MB per
step); ``fsdp`` shards every decoder layer and then the root with FSDP2 ``fully_shard``;
``deepspeed`` runs ZeRO stage 2 or 3 with optional CPU offload
(:mod:`tunedag.train.deepspeed_engine`).
Every run ends with a barrier and ``destroy_process_group`` (a rank that exits without them
sometimes aborts at exit and fails an otherwise finished job).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from transformers import get_scheduler

from tunedag.config import RunConfig
from tunedag.data.shards import ShardReader
from tunedag.io import atomic_path, write_json
from tunedag.train import checkpoint as ckpt
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import (SCHEDULERS, _truncate_metrics, check_objective, loss_units, micro_batches,
                                seed_everything, total_steps)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- environment

def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``gpu[017-020,031],cpu01`` → ``gpu017``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "DistEnv":
        """From Slurm's task variables, else torchrun's, else a single process."""
        env = os.environ if environ is None else environ
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
            job = int(env.get("SLURM_JOB_ID", "0"))
            restart = int(env.get("SLURM_RESTART_COUNT", "0"))
            # a new port after each requeue: the previous run's socket may linger in TIME_WAIT
            port = 20000 + (job * 97 + restart * 7919) % 40000
            return cls(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
                       world_size=int(env["SLURM_NTASKS"]), master_addr=first_host(env["SLURM_JOB_NODELIST"]),
                       master_port=int(env.get("TUNEDAG_MASTER_PORT", port)))
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", "0")),
                       world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", "29500")))
        return cls()

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_process_group(env: DistEnv, timeout_s: int = 600) -> None:
    """nccl on GPUs, gloo on CPU; TCP rendezvous at the master address."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d: %s process group via %s:%d", env.rank, env.world_size, backend,
             env.master_addr, env.master_port)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sum(value: float | int, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t.item())


def _any(flag: bool, device: torch.device) -> bool:
    return _sum(1.0 if flag else 0.0, device) > 0


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- engines

def adamw(params: list[torch.nn.Parameter], run: RunConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay)


class DataParallelEngine:
    """The torch engine on every rank; trainable gradients summed across ranks after backward."""

    name = "ddp"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv):
        self.env = env
        self.inner = TorchEngine(run, model_path, env.device())
        self.model, self.device = self.inner.model, self.inner.device
        self.loss_scale = 1.0  # the gradient all-reduce sums
        self.optimizer = adamw(self.trainable_parameters(), run)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.inner.trainable_parameters()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.loss_sum(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def step(self, max_norm: float) -> float:
        """Sum the gradients over ranks, clip, update, zero them; return the norm before clipping."""
        self.sync_gradients()
        norm = self.clip(max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def sync_gradients(self) -> None:
        if not dist.is_initialized() or self.env.world_size == 1:
            return
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket: LoRA weights are small
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm or float("inf")))

    def load(self, path: Path, state: dict[str, Any]) -> None:
        self.inner.load_trainable(path)
        self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, root: Path, scheduler, position: ckpt.Position, config_hash: str,
                        keep_last: int) -> None:
        # replicas are identical: rank 0 writes the single-process format (resumable by either)
        if self.env.is_main:
            ckpt.save_checkpoint(root, self.model, self.optimizer, scheduler, position, config_hash, keep_last)

    def save_final(self, dest: Path) -> None:
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                self.inner.save(tmp)


class FSDPEngine(DataParallelEngine):
    """FSDP2: ``fully_shard`` on every decoder layer, then on the root (frozen base + LoRA per unit).

    FSDP averages gradients over ranks; the loss is scaled by the world size so the reduced
    gradient is the sum, as in the single-process loop (exact for a power-of-two world size).
    Checkpoints hold full (gathered) adapter weights and a full optimizer state keyed by
    parameter name, so they do not depend on the number of ranks.
    """

    name = "fsdp"

    def __init__(self, run: RunConfig, model_path: Path, env: DistEnv, resume_from: Path | None = None):
        from torch.distributed.fsdp import fully_shard

        self.env = env
        self.inner = TorchEngine(run, model_path, env.device())
        if resume_from is not None:  # before sharding: the plain PEFT model loads the adapter
            self.inner.load_trainable(resume_from)
        self.model, self.device = self.inner.model, self.inner.device
        layers = self.model.get_base_model().model.layers
        for layer in layers:
            fully_shard(layer)
        fully_shard(self.model)
        self.loss_scale = float(env.world_size)
        self.optimizer = adamw(self.trainable_parameters(), run)

    def sync_gradients(self) -> None:  # the reduce-scatter in backward did it
        pass

    def clip(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def load(self, path: Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=self._options())

    def _gather(self, optimizer=None) -> tuple[dict, dict | None]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        weights = get_model_state_dict(self.model, options=self._options(ignore_frozen_params=True))
        optim = get_optimizer_state_dict(self.model, optimizer, options=self._options()) if optimizer else None
        return weights, optim

    def save_checkpoint(self, root: Path, scheduler, position: ckpt.Position, config_hash: str,
                        keep_last: int) -> None:
        weights, optim = self._gather(self.optimizer)  # collective: every rank takes part
        if not self.env.is_main:
            return
        with atomic_path(root / f"step-{position.step}") as tmp:
            self.model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                        "position": asdict(position), "config_hash": config_hash, "engine": self.name},
                       tmp / ckpt.STATE_FILE)
        for old in ckpt.list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self, dest: Path) -> None:
        weights, _ = self._gather()
        if self.env.is_main:
            with atomic_path(dest) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)


def pick_engine_name(run: RunConfig, world_size: int) -> str:
    """ddp, fsdp or deepspeed as asked; auto (and torch/triton, which are single-rank engines): ddp."""
    return run.train_engine if run.train_engine in ("ddp", "fsdp", "deepspeed") else "ddp"


def make_parallel_engine(run: RunConfig, model_path: Path, env: DistEnv, resume_from: Path | None, run_dir: Path):
    name = pick_engine_name(run, env.world_size)
    if name == "deepspeed":
        from tunedag.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(run, model_path, env, run_dir)
    if name == "fsdp":
        return FSDPEngine(run, model_path, env, resume_from)
    return DataParallelEngine(run, model_path, env)


# --------------------------------------------------------------------------- the loop

def _latest(ckpt_root: Path, config_hash: str, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest complete checkpoint (removing stale ones); every rank gets its path."""
    found = ckpt.latest_checkpoint(ckpt_root, config_hash) if env.is_main else None
    if env.is_main and found is None:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    found = _broadcast(str(found) if found else None)
    return Path(found) if found else None


def train_distributed(run: RunConfig, shards_dir: Path, model_path: Path, run_dir: Path, env: DistEnv,
                      should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Train ``run`` on this rank; return train_info (every rank), or None when stopped early.

    ``should_stop`` is polled after every optimizer step (a pre-timeout or preemption signal);
    when any rank sees it, all ranks write a complete checkpoint at that step and return None.
    """
    config_hash = run.stage_hash("train")
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    ckpt_root = run_dir / "checkpoints"
    resumed = _latest(ckpt_root, config_hash, env)
    seed_everything(run.seed)
    check_objective(run, shards_dir, manifest)
    engine = make_parallel_engine(run, model_path, env, resumed, run_dir)
    count = loss_units(run, shards_dir, manifest, engine.inner.model.config, engine.inner.objective)
    reader = ShardReader(shards_dir / "train", env.rank, env.world_size)
    steps = total_steps(run, len(reader))
    scheduler = get_scheduler(SCHEDULERS[run.lr_scheduler], engine.optimizer,
                              num_warmup_steps=run.warmup_steps, num_training_steps=steps)
    position = ckpt.Position()
    if resumed is not None:
        state = ckpt.load_state(resumed)
        engine.load(resumed, state)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])  # ranks consume randomness alike: rank 0's state is everyone's
        position = ckpt.Position(**state["position"])
        log.info("rank %d resuming from %s (step %d of %d)", env.rank, resumed, position.step, steps)
    live_metrics = ckpt_root / "metrics.jsonl"
    if env.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(live_metrics, position.step)
    if dist.is_initialized():
        dist.barrier()

    batches = micro_batches(reader, run, manifest["pad_token_id"], position)
    started, tokens_at_start = time.perf_counter(), position.tokens_seen
    last_loss, stopped = float("nan"), False
    metrics = open(live_metrics, "a") if env.is_main else None
    try:
        while position.step < steps:
            group = [b for _, b in zip(range(run.gradient_accumulation_steps), batches)]
            if not _any(bool(group), engine.device):
                break
            n_tokens = _sum(sum(count(b) for b, _, _ in group), engine.device)  # or pairs/samples for rl
            loss_total = 0.0
            for batch, _, _ in group:
                loss = engine.loss_sum(batch) / max(n_tokens, 1)
                engine.backward(loss)
                loss_total += loss.item()
            loss_total = _sum(loss_total, engine.device)
            grad_norm = engine.step(run.max_grad_norm)
            scheduler.step()
            _, position.epoch, position.offset = group[-1]
            position.step += 1
            position.tokens_seen += int(_sum(sum(int(b["input_ids"].numel()) for b, _, _ in group), engine.device))
            last_loss = loss_total
            if metrics and (position.step % run.logging_steps == 0 or position.step == steps):
                elapsed = time.perf_counter() - started
                record = {"step": position.step, "epoch": position.epoch, "loss": round(loss_total, 6),
                          "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "trained_tokens": int(n_tokens), "tokens_seen": position.tokens_seen,
                          "tokens_per_s": round((position.tokens_seen - tokens_at_start) / max(elapsed, 1e-9), 1),
                          "world_size": env.world_size}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                log.info("step %d/%d loss %.4f lr %.3g", position.step, steps, loss_total, record["learning_rate"])
            stopped = _any(should_stop(), engine.device) and position.step < steps
            if stopped or position.step % run.save_steps == 0 or position.step == steps:
                engine.save_checkpoint(ckpt_root, scheduler, position, config_hash, run.keep_last_checkpoints)
            if stopped:
                log.warning("rank %d: stopping at step %d after a complete checkpoint", env.rank, position.step)
                return None
    finally:
        if metrics:
            metrics.close()

    engine.save_final(run_dir / "adapter")
    info = {"config_hash": config_hash, "engine": engine.name, "device": str(engine.device),
            "world_size": env.world_size, "steps": position.step, "tokens_seen": position.tokens_seen,
            "final_loss": last_loss, "resumed_from": str(resumed) if resumed else None,
            "position": asdict(position), "shards_config_hash": manifest["config_hash"]}
    if env.is_main:
        with atomic_path(run_dir / "train_metrics.jsonl") as tmp:
            shutil.copyfile(live_metrics, tmp)
        write_json(run_dir / "train_info.json", info)
    if dist.is_initialized():
        dist.barrier()
    return info
