"""Where a training process sits in its job: rank, device, process group, and the collectives the
loop needs (each a no-op in a single process).

Ranks, world size and the master address come from the Slurm environment (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``) or, outside
Slurm, from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; neither means one
process.

The device is chosen before any collective (NCCL binds a communicator to the current device):
a task that sees every GPU of its node takes the one of its local rank; a task that sees only
its own (``--gpu-bind``, ``--gpus-per-task``, ``CUDA_VISIBLE_DEVICES`` per task) takes index 0;
a single process on a machine with several GPUs trains on the first. ``LOCAL_RANK`` is then
set to that index, because DeepSpeed sets its device from it.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list: ``gpu[017-020,031],cpu01`` → ``gpu017``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``attempt`` names this start of it (a requeue is another)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    attempt: str = "local"

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
                       master_port=int(env.get("TUNEDAG_MASTER_PORT", port)), attempt=f"slurm-{job}-{restart}")
        if "RANK" in env and "WORLD_SIZE" in env:
            port = int(env.get("MASTER_PORT", "29500"))
            attempt = f"torchrun-{env.get('TORCHELASTIC_RUN_ID', 'none')}-{port}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            return cls(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", "0")),
                       world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=port, attempt=attempt)
        return cls()


def choose_device(env: DistEnv) -> torch.device:
    """This rank's device, made current (see the module docstring); call before any collective."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if env.world_size == 1 or visible == 1:
        index = 0
    elif env.local_rank < visible:
        index = env.local_rank
    else:
        raise RuntimeError(f"rank {env.rank} (local rank {env.local_rank}) sees {visible} GPUs: "
                           "give each task its own GPU or let it see all of its node's")
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed's device
    return torch.device("cuda", index)


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int = 600) -> None:
    """nccl on GPUs, gloo on CPU; TCP rendezvous at the master address; bound to ``device``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **extra)
    log.info("rank %d/%d on %s: %s process group via %s:%d", env.rank, env.world_size, device, backend,
             env.master_addr, env.master_port)


def shutdown() -> None:
    """End a finished run: a rank that exits without barrier + destroy sometimes aborts at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: float | int, device: torch.device) -> float:
    """``value`` summed over ranks (float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    return all_sum(1.0 if flag else 0.0, device) > 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
