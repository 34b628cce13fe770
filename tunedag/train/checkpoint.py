"""Resumable checkpoints: ``{run_dir}/checkpoints/step-N/``, each complete or absent, one writer
for every engine.

A checkpoint holds the engine's payload (its trainable weights and optimizer state, in the
engine's own layout: a PEFT adapter folder, or a full fine-tune's model folder, + ``optimizer.pt``;
FSDP's gathered state, or a full fine-tune's ``torch.distributed.checkpoint`` shards; or
DeepSpeed's per-rank partitions) and the loop's trainer state (``trainer_state.pt``: schedule,
every RNG state, the data position, the resume key, the engine, the world size and the size of
every payload file). Every rank writes its part into ``.step-N.partial``; rank 0 then adds the
trainer state and renames the folder, so a killed job leaves either the whole checkpoint or
none. A checkpoint is resumed only when its payload files are all there at their recorded sizes
(else the one before it is) and its resume key matches: the train config, the shards' content,
the base model and the training code (:func:`resume_key`), so changed data, a changed model or
a code update never continue an old run.

The trainer state is read with ``torch.load(weights_only=True)``: tensors and plain Python
values only, so a checkpoint copied from someone else's run folder cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tunedag.errors import TunedagError
from tunedag.train.ranks import DistEnv, barrier

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


@dataclass
class Position:
    """Where training is: optimizer steps done, and the next micro-batch's epoch and row offset."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    tokens_seen: int = 0


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(root: Path, step: int, env: DistEnv, write_payload: Callable[[Path], None],
                     trainer_state: dict[str, Any], keep_last: int) -> None:
    """Collective: every rank calls it; ``write_payload(folder)`` writes this rank's part of the engine's
    state, rank 0 adds ``trainer_state``, renames ``.step-N.partial`` to ``step-N`` and drops all but
    the newest ``keep_last`` checkpoints."""
    dest = root / f"step-{step}"
    partial = root / f".{dest.name}.partial"
    if env.is_main:
        for stale in root.glob(".step-*.partial"):  # left by a job killed mid-save
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    barrier()
    write_payload(partial)
    barrier()
    if env.is_main:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        torch.save({**trainer_state, "files": files}, partial / STATE_FILE)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(partial, dest)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class CheckpointError(TunedagError, ValueError):
    """A checkpoint that cannot be read safely; names the file."""


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state tunedag can load safely (only tensors and "
                              f"plain values are read; {first}); delete {path} to resume from an earlier "
                              "checkpoint or start over") from None


def missing_files(path: Path, state: dict[str, Any]) -> list[str]:
    """Payload files of the checkpoint at ``path`` that are gone or not at their recorded size."""
    return [name for name, size in state["files"].items()
            if not (path / name).is_file() or (path / name).stat().st_size != size]


def latest_checkpoint(root: Path, key: str, steps: int) -> Path | None:
    """The newest complete checkpoint written with resume key ``key`` before step ``steps``; the stale
    and the broken ones (a payload file gone or cut short) are removed, so the one before them is
    resumed. The end of a finished run (step ``steps``) is not resumed: running the stage again trains
    again."""
    for path in reversed(list_checkpoints(root)):
        state = load_state(path)
        if state.get("resume_key") != key:
            log.warning("removing checkpoint %s: written by another train config, data, base model or "
                        "tunedag version", path)
        elif missing := missing_files(path, state):
            log.warning("removing checkpoint %s: %s missing or cut short", path, ", ".join(missing))
        elif state["position"]["step"] >= steps:
            log.info("%s is the end of a finished run: training again from step 0", path)
            return None
        else:
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def resume_key(config_hash: str, manifest: dict[str, Any], model_path: Path) -> str:
    """What a checkpoint must have been written with to be resumed: the train config, the shards'
    manifest (their sha256 values), the base model (config.json and the names and sizes of its
    weight files: hashing 16 GB of weights at every start would cost a minute) and the source of
    the code that trains (tunedag's train and models packages, the kernels, the batch contract)."""
    digest = hashlib.sha256(config_hash.encode())
    digest.update(json.dumps(manifest, sort_keys=True).encode())
    model_path = Path(model_path)
    digest.update((model_path / "config.json").read_bytes())
    for weights in sorted(model_path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    for source in _training_sources():
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def _training_sources() -> list[Path]:
    package = Path(__file__).resolve().parents[1]
    files = [*package.glob("train/*.py"), *package.glob("models/*.py"), *package.joinpath("kernels").glob("*.py"),
             package / "data" / "batches.py", package / "data" / "shards.py"]
    return sorted(files, key=lambda p: (p.parent.name, p.name))
