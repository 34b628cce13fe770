"""When one rank of a job fails, the others stop within seconds and the job's error names it.

A rank blocked in a collective waits for a peer that has died until the process group's
timeout (NCCL: tens of minutes), so the job would sit on its GPUs until the time limit. Instead
the ranks share a board on the run folder (a filesystem every rank and the login node see):

- a failing rank writes ``{run_dir}/rank_failures/{attempt}/rank-{r}.json`` (its error, first
  line and type) before it exits;
- every rank of a multi-rank job runs a watcher thread that polls the board; when another rank
  has failed it logs that rank's error and ends this process with exit code 1 (a thread cannot
  interrupt a blocked collective any other way);
- the launcher reads the board of a failed job to name the failing rank and its error.

``attempt`` (a Slurm job id and restart count, or torchrun's run) keeps a requeued job from
seeing the failures of its previous start.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

from tunedag.io import write_json
from tunedag.train.ranks import DistEnv, init_process_group, shutdown

log = logging.getLogger(__name__)
BOARD = "rank_failures"


def board_dir(run_dir: Path, attempt: str) -> Path:
    return Path(run_dir) / BOARD / attempt


def report_failure(run_dir: Path, attempt: str, rank: int, error: BaseException) -> None:
    """Put this rank's error on the board (never raises: it runs while an error is propagating)."""
    try:
        folder = board_dir(run_dir, attempt)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"rank-{rank}.json", {
            "rank": rank, "host": os.uname().nodename, "type": type(error).__name__,
            "error": str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            "traceback": traceback.format_exception(error)[-12:]})
    except OSError as err:
        log.error("could not record rank %d's failure on the board: %s", rank, err)


def failures(run_dir: Path, attempt: str) -> list[dict[str, Any]]:
    """The failures recorded for ``attempt``, by rank."""
    folder = board_dir(run_dir, attempt)
    found = []
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda f: f["rank"])


def describe(failed: list[dict[str, Any]]) -> str:
    return "; ".join(f"rank {f['rank']} on {f['host']} failed: {f['type']}: {f['error']}" for f in failed)


def latest_failures(run_dir: Path, attempt_prefix: str = "") -> list[dict[str, Any]]:
    """The failures of the most recent attempt (whose name starts with ``attempt_prefix``: one Slurm
    job's starts are ``slurm-{job id}-{restart}``) that recorded any: what the launcher reports."""
    root = Path(run_dir) / BOARD
    attempts = [p for p in root.iterdir() if p.name.startswith(attempt_prefix)] if root.is_dir() else []
    for attempt in sorted(attempts, key=lambda p: p.stat().st_mtime, reverse=True):
        found = failures(run_dir, attempt.name)
        if found:
            return found
    return []


class FailureWatch:
    """Polls the board every ``poll_s`` seconds on a daemon thread; exits this process when another
    rank has failed. A context manager: the watch ends with the block."""

    def __init__(self, run_dir: Path, attempt: str, rank: int, poll_s: float = 2.0):
        self.run_dir, self.attempt, self.rank, self.poll_s = Path(run_dir), attempt, rank, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tunedag-failure-watch", daemon=True)

    def __enter__(self) -> "FailureWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            others = [f for f in failures(self.run_dir, self.attempt) if f["rank"] != self.rank]
            if others and not self._stop.is_set():
                log.error("rank %d: stopping because %s", self.rank, describe(others))
                logging.shutdown()
                os._exit(1)


@contextlib.contextmanager
def rank_session(run_dir: Path, env: DistEnv, device: torch.device, group: bool) -> Iterator[None]:
    """Run the block as this rank of the job: with ``group``, in a process group that is shut down
    when the block ends; on several ranks, on the failure board (a failure is reported, another
    rank's failure ends this process). A failed rank leaves the group without a barrier or
    ``destroy_process_group``: its peers may be gone or blocked, and NCCL's teardown would wait."""
    if group and not torch.distributed.is_initialized():
        init_process_group(env, device)
    watch = FailureWatch(run_dir, env.attempt, env.rank) if env.world_size > 1 else contextlib.nullcontext()
    try:
        with watch:
            yield
    except Exception as err:
        if env.world_size > 1:
            report_failure(run_dir, env.attempt, env.rank, err)
        raise
    shutdown()
