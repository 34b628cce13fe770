"""Builders the tests share: a built-in model folder, sample data, a run config."""
from __future__ import annotations

import json
from pathlib import Path

from tunedag.config import RunConfig, parse_config
from tunedag.data.sample_task import animal_rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run(data_path: Path, **overrides) -> RunConfig:
    """A run config over ``data_path`` with the built-in model; ``overrides`` set any run key."""
    raw = {"runs": {"t": {"base_model": "builtin:tiny-llama",
                          "datasets": [{"path": str(data_path), "type": "alpaca"}],
                          "sequence_len": 128, "micro_batch_size": 4, "seed": 1, **overrides}}}
    return parse_config(raw, base_dir=Path("/")).runs["t"]


def sample_rows(n: int, seed: int = 0) -> list[dict]:
    return animal_rows(n, seed)
