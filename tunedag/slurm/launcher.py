"""Submit the training stage as ONE Slurm job through submitit, stream its log, wait, report.

The train rule runs on the login node (a local rule under profiles/slurm) and calls
:func:`run_training_job`: one ``sbatch`` with ``nodes`` × ``tasks_per_node`` tasks (one per
GPU), each running :class:`tunedag.slurm.job.TrainJob`. The rank-0 log is copied to this
process's stderr (the rule's log) while the job runs; polling is bounded (every
``poll_s`` seconds, up to ``max_wait_s`` in all). When the job ends without a result, the
error names the Slurm job id, its final state (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY,
NODE_FAIL…), the rank that failed first and its error (:mod:`tunedag.train.rank_failures`), the
log path and the log's last lines; rerunning the workflow resumes from the
newest checkpoint. :func:`sbatch_script` shows the script ``sbatch`` would get.

Resources come from ``cluster.train`` in config.yaml. Partition, account and QOS left out
there fall back to Slurm's own ``SBATCH_PARTITION``/``SBATCH_ACCOUNT``/``SBATCH_QOS``
environment variables, then to the cluster's defaults.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import submitit

from tunedag.config import ClusterResources, time_minutes
from tunedag.errors import TunedagError
from tunedag.slurm.job import TrainJob
from tunedag.slurm.sbatch_errors import sbatch_refusal
from tunedag.train.rank_failures import describe, latest_failures

log = logging.getLogger(__name__)


class SlurmJobError(TunedagError):
    """A Slurm job that ended without a result: its id, state and log path are in the message."""

    def __init__(self, job_id: str, state: str, log_path: Path, detail: str):
        self.job_id, self.state, self.log_path, self.detail = job_id, state, log_path, detail
        super().__init__(f"Slurm job {job_id} ended in state {state}; log: {log_path}\n{detail}")


def minutes(limit: str) -> int:
    """``"04:00:00"`` → 240, ``"1-00:00:00"`` → 1440 (seconds round up: Slurm limits are whole minutes)."""
    return time_minutes(limit)


def sbatch_parameters(args: list[str]) -> dict[str, Any]:
    """``['--exclusive', '--gres-flags=enforce-binding']`` → submitit's additional parameters."""
    out: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--"):
            raise TunedagError(f"cluster.train.sbatch_args: {arg!r} is not a long sbatch option (--name[=value])")
        key, sep, value = arg[2:].partition("=")
        out[key.replace("-", "_")] = value if sep else True
    return out


def make_executor(res: ClusterResources, folder: Path, job_name: str) -> submitit.AutoExecutor:
    tasks = res.tasks_per_node or max(res.gpus_per_node, 1)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=1000)
    params: dict[str, Any] = {
        "name": job_name, "nodes": res.nodes, "tasks_per_node": tasks, "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb, "timeout_min": minutes(res.time), "slurm_signal_delay_s": res.signal_delay_s,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(res, key) or os.environ.get(f"SBATCH_{key.upper()}")
        if value:
            params[f"slurm_{key}"] = value
    extra = sbatch_parameters(list(res.sbatch_args))
    extra.setdefault("requeue", True)  # preemption and the pre-timeout signal requeue the job
    params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The batch script submitit would hand to sbatch (nothing is submitted)."""
    inner = executor._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


class _Tail:
    """Copies new lines of a growing file; starts over when the file is truncated (a requeue)."""

    def __init__(self, path: Path, out: TextIO):
        self.path, self.out, self.offset = path, out, 0

    def pump(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:
            self.offset = 0
        if size > self.offset:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(size - self.offset)
            self.offset = size
            self.out.write(chunk.decode(errors="replace"))
            self.out.flush()


def submit(job: TrainJob, res: ClusterResources, folder: Path, job_name: str) -> submitit.Job:
    executor = make_executor(res, folder, job_name)
    try:  # submitit echoes sbatch's stderr before raising; the one-line error below says it once
        with contextlib.redirect_stderr(io.StringIO()):
            submitted = executor.submit(job)
    except submitit.core.utils.FailedJobError as err:
        raise sbatch_refusal(str(err), "train") from None
    log.info("submitted Slurm job %s (%d node(s) x %d task(s)); log: %s", submitted.job_id, res.nodes,
             res.tasks_per_node or max(res.gpus_per_node, 1), submitted.paths.stderr)
    return submitted


def wait(job: submitit.Job, poll_s: float = 5.0, max_wait_s: float | None = None,
         stream: TextIO | None = sys.stderr) -> Any:
    """Poll ``job`` until it ends, copying its rank-0 log; its result, or SlurmJobError."""
    tails = [_Tail(job.paths.stdout, stream), _Tail(job.paths.stderr, stream)] if stream else []
    deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
    try:
        while not job.done():
            for t in tails:
                t.pump()
            if deadline is not None and time.monotonic() > deadline:
                raise SlurmJobError(job.job_id, job.state, job.paths.stderr,
                                    f"still not finished after {max_wait_s:.0f} s of waiting; "
                                    f"it keeps running (scancel {job.job_id} to stop it)")
            time.sleep(poll_s)
    finally:
        for t in tails:
            t.pump()
    error = job.exception()
    if error is not None:
        raise SlurmJobError(job.job_id, final_state(job), job.paths.stderr, _last_lines(job, error))
    return job.results()[0]  # rank 0 returns the result; other ranks None


ACTIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED")


def final_state(job: submitit.Job, timeout_s: float = 60.0) -> str:
    """The job's Slurm state once it has left the active states (the result file can come first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.get_info(mode="force").get("State") or job.state
        if not state.startswith(ACTIVE_STATES) and state != "UNKNOWN" or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def _last_lines(job: submitit.Job, error: BaseException, n: int = 30) -> str:
    lines = []
    for path in (job.paths.stderr, job.paths.stdout):
        if path.is_file():
            lines = path.read_text(errors="replace").splitlines()[-n:]
            if lines:
                break
    cause = str(error).strip().splitlines()
    return "\n".join([*(cause[-5:] if cause else []), "--- last lines of the log ---", *lines])


def run_training_job(config_path: Path, run: str, shards: Path, model: Path, run_dir: Path,
                     res: ClusterResources, dry_run: bool = False, poll_s: float = 5.0,
                     max_wait_s: float | None = None) -> dict[str, Any] | None:
    """Submit training as one Slurm job and wait for it (or, with ``dry_run``, print its script)."""
    folder = Path(run_dir).resolve() / "slurm"
    job = TrainJob(str(config_path), run, str(shards), str(model), str(run_dir))
    name = f"tunedag-train-{run}"
    if dry_run:
        print(sbatch_script(make_executor(res, folder, name)))
        return None
    submitted = submit(job, res, folder, name)
    try:
        info = wait(submitted, poll_s=poll_s, max_wait_s=max_wait_s)
    except SlurmJobError as err:
        failed = latest_failures(run_dir, f"slurm-{submitted.job_id}-")
        if not failed:
            raise
        raise SlurmJobError(err.job_id, err.state, err.log_path, f"{describe(failed)}\n{err.detail}") from None
    log.info("Slurm job %s finished: %s", submitted.job_id,
             " ".join(f"{k}={shlex.quote(str(info.get(k)))}" for k in ("steps", "final_loss", "world_size")))
    return info
