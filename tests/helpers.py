"""Builders the tests share: a built-in model folder, sample data, a run config."""
from __future__ import annotations

import collections
import json
import random
import types
from pathlib import Path

import torch

from tunedag.config import DatasetConfig, RunConfig, parse_config
from tunedag.data.sample_task import ANIMALS, INSTRUCTION, OTHER_WORDS, animal_rows


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


def tokenize_with_model(run: RunConfig, raw_dirs: list[Path], model_dir: Path, out_dir: Path,
                        processes: int = 1) -> dict:
    """``tokenize_run`` with the tokenizer of ``model_dir``, loaded as scripts/tokenize.py loads it."""
    from tunedag.data.tokenize import tokenize_run
    from tunedag.models.loading import load_run_tokenizer

    tokenizer = load_run_tokenizer(model_dir, run)
    return tokenize_run(run, raw_dirs, model_dir, tokenizer, out_dir, processes=processes)


def sample_rows(n: int, seed: int = 0) -> list[dict]:
    return animal_rows(n, seed)


def preference_rows(n: int, seed: int) -> list[dict]:
    """The built-in task as pairs: chosen = the animal in the list, rejected = another word of it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(OTHER_WORDS, rng.randint(2, 5))
        animal = rng.choice(ANIMALS)
        wrong = rng.choice(words)
        words.insert(rng.randrange(len(words) + 1), animal)
        rows.append({"prompt": f"{INSTRUCTION}\n{' '.join(words)}", "chosen": animal, "rejected": wrong})
    return rows


def tokenized_pairs(root: Path, model_dir: Path, rows: list[dict], rl: str = "dpo", data_type: str = "dpo",
                    **overrides) -> tuple[RunConfig, Path]:
    """``rows`` as type: dpo (or ``data_type``) data through download and tokenize under ``root``: (run, packed
    shards folder)."""
    from tunedag.data.download import download_dataset

    src = write_jsonl(root / "src.jsonl", rows)
    download_dataset(DatasetConfig(path=str(src), type=data_type), root / "raw")
    run = tiny_run(src, datasets=[{"path": str(src), "type": data_type}], rl=rl, **overrides)
    tokenize_with_model(run, [root / "raw"], model_dir, root / "packed")
    return run, root / "packed"


def kto_rows(n: int, seed: int) -> list[dict]:
    """The preference pairs as KTO samples: a conversation with the chosen (desirable) or rejected answer."""
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["chosen"] if k % 2 else r["rejected"]}],
             "label": bool(k % 2)} for k, r in enumerate(preference_rows(n, seed))]


def tokenized_kto(root: Path, model_dir: Path, n: int, seed: int, **overrides) -> tuple[RunConfig, Path]:
    """``kto_rows(n, seed)`` as type: kto data for rl: kto through download and tokenize under ``root``."""
    return tokenized_pairs(root, model_dir, kto_rows(n, seed), rl="kto", data_type="kto", **overrides)


class _Accelerator:
    """What TRL's loss methods ask of accelerate's Accelerator on one CPU process."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m


def trl_trainer_state(**attrs) -> types.SimpleNamespace:
    """The attributes TRL's loss methods read from their trainer, without building one."""
    return types.SimpleNamespace(accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
                                 aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
                                 _total_train_tokens=0, _tp_size=1, **attrs)
