"""What runs inside the Slurm training job: one call per task (rank), checkpointable by submitit.

submitit installs a handler for the pre-timeout / preemption signal (USR2, sent
``signal_delay_s`` before the time limit) that would call ``checkpoint()`` from inside whatever
the process is doing. A checkpoint taken mid-step is not a consistent one, so the job replaces
that handler (and SIGTERM's, which scancel and preemption send) with a flag: the loop polls it after every optimizer step (all ranks agree through
one all-reduce), writes the usual atomic checkpoint at that step, and only then does rank 0
hand the signal to submitit, which requeues the job. The requeued job calls this object again
and the loop resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import submitit
import torch

log = logging.getLogger(__name__)


class TrainJob(submitit.helpers.Checkpointable):
    """``TrainJob(config, run, shards, model, run_dir)()`` trains one run on this task's rank."""

    def __init__(self, config_path: str, run: str, shards: str, model: str, run_dir: str):
        self.config_path, self.run, self.shards, self.model, self.run_dir = (
            str(Path(config_path).resolve()), run, str(Path(shards).resolve()),
            str(Path(model).resolve()), str(Path(run_dir).resolve()))

    def __call__(self) -> dict[str, Any] | None:
        from tunedag.config import load_run
        from tunedag.train.loop import train
        from tunedag.train.ranks import DistEnv

        env = DistEnv.from_environment()
        logging.basicConfig(level=os.environ.get("TUNEDAG_LOG_LEVEL", "INFO"), force=True,
                            format=f"%(asctime)s train[{env.rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
        if cpus:
            torch.set_num_threads(cpus)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        requested: list[int] = []
        # USR2: time limit near or preemption (checkpoint, requeue). TERM: scancel, or preemption's
        # grace period (checkpoint, exit; submitit alone would ignore it and run on until SIGKILL)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: requested.append(signum))

        _, run = load_run(self.config_path, self.run)
        log.info("rank %d of %d on %s (job %s, restart %s)", env.rank, env.world_size, os.uname().nodename,
                 os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0"))
        info = train(run, Path(self.shards), Path(self.model), Path(self.run_dir), env,
                     should_stop=lambda: bool(requested))
        if info is None:  # stopped by a signal, checkpoint written
            if signal.SIGUSR2 in requested and env.is_main and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + requeue + exit
            log.warning("rank %d: exiting after the checkpoint (%s)", env.rank,
                        ", ".join(signal.Signals(s).name for s in sorted(set(requested))))
            sys.exit(0 if signal.SIGUSR2 in requested else 128 + signal.SIGTERM)
        return info if env.is_main else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The state is on disk already (the loop's checkpoint): resubmit the same call."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
