"""Resumable checkpoints: ``{run_dir}/checkpoints/step-N/``, each complete or absent.

A checkpoint holds the trainable weights (PEFT adapter format), the optimizer and scheduler
states, every RNG state, the data position and the config hash of the run that wrote it. It is
written under a temporary name and renamed, so a killed job leaves either the whole checkpoint
or none; a checkpoint written by a different train config is never resumed.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunedag.io import atomic_path

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model, optimizer, scheduler, position: Position, config_hash: str,
                    keep_last: int) -> Path:
    dest = root / f"step-{position.step}"
    with atomic_path(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "position": asdict(position), "config_hash": config_hash},
                   tmp / STATE_FILE)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path, config_hash: str) -> Path | None:
    """The newest complete checkpoint written by this train config; stale ones are removed."""
    checkpoints = list_checkpoints(root)
    for path in reversed(checkpoints):
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state["config_hash"] == config_hash:
            return path
        log.warning("removing checkpoint %s: written by a different train config", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
