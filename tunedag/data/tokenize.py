"""The tokenize stage: raw Parquet rows → packed Arrow shards + manifest.json.

Rows are split into train and val with the run's seed, tokenized with the base model's
tokenizer in the dataset's format, and packed. The manifest records what made the shards: the
config slice, the tokenizer files and this package's data code, each hashed, so a changed
template or tokenizer can never reuse stale shards.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tunedag.config import RunConfig
from tunedag.data import formats, packing, shards
from tunedag.data.formats import FORMATS, PROMPTS, RowFormatError, Sample
from tunedag.errors import TunedagError
from tunedag.io import atomic_path, sha256_file
from tunedag.models.loading import load_tokenizer

CODE_FILES = [Path(formats.__file__), Path(packing.__file__), Path(shards.__file__), Path(__file__)]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja")


class TokenizeError(TunedagError, ValueError):
    """A problem with the data as a whole (empty, too small a split, a sample too long)."""


def code_hash() -> str:
    """sha256 over the source of the code that turns rows into shards."""
    digest = hashlib.sha256()
    for path in CODE_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tokenizer_hash(model_path: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_path / name).is_file():
            digest.update(name.encode() + sha256_file(model_path / name).encode())
    return digest.hexdigest()


def _read_rows(raw_dir: Path) -> list[dict[str, Any]]:
    parquet = raw_dir / "data.parquet"
    if not parquet.is_file():
        raise FileNotFoundError(f"{parquet}: not found (run the download stage)")
    return pq.read_table(parquet).to_pylist()


def _val_count(n_rows: int, val_set_size: float, where: str) -> int:
    count = round(n_rows * val_set_size) if val_set_size < 1 else int(val_set_size)
    if count >= n_rows:
        raise TokenizeError(f"{where}: val_set_size {val_set_size} leaves no training rows "
                            f"(the data has {n_rows} rows)")
    return max(count, 1)


def tokenize_run(run: RunConfig, raw_dirs: list[Path], model_path: Path, out_dir: Path) -> dict[str, Any]:
    """Build ``out_dir`` (train/, val/, val_prompts.jsonl, manifest.json) for ``run``."""
    tok = load_tokenizer(model_path, run.trust_remote_code)
    if tok.eos_token_id is None:
        raise TokenizeError(f"{model_path}: the tokenizer has no eos_token; set one in tokenizer_config.json")
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    prompts: list[dict[str, str]] = []
    counts: dict[str, int] = {"rows": 0, "too_long_dropped": 0}
    for ds, raw_dir in zip(run.datasets, raw_dirs):
        rows = _read_rows(raw_dir)
        if not rows:
            raise TokenizeError(f"{raw_dir / 'data.parquet'}: dataset {ds.dataset_name!r} has no rows")
        order = list(range(len(rows)))
        random.Random(run.seed).shuffle(order)
        n_val = _val_count(len(rows), run.val_set_size, f"dataset {ds.dataset_name!r}")
        val_rows = set(order[:n_val])
        for i, row in enumerate(rows):
            try:
                sample = FORMATS[ds.type](row, tok, run.train_on_inputs)
                prompt = PROMPTS[ds.type](row) if i in val_rows and ds.type in PROMPTS else None
            except RowFormatError as err:
                raise RowFormatError(f"{raw_dir / 'data.parquet'} (source {ds.path}): row {i}: {err}") from err
            counts["rows"] += 1
            if len(sample.input_ids) > run.sequence_len:
                counts["too_long_dropped"] += 1
                continue
            splits["val" if i in val_rows else "train"].append(sample)
            if prompt is not None:
                prompts.append({"dataset": ds.dataset_name, "prompt": prompt.text,
                                "reference": prompt.reference})
    if not splits["train"]:
        raise TokenizeError(f"run has no training samples left (all {counts['rows']} rows longer than "
                            f"sequence_len {run.sequence_len}?)")
    manifest: dict[str, Any] = {
        "sequence_len": run.sequence_len, "sample_packing": run.sample_packing,
        "padded": not run.sample_packing, "config_hash": run.stage_hash("tokenize"),
        "tokenizer_hash": tokenizer_hash(model_path), "code_hash": code_hash(),
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "counts": counts, "splits": {},
    }
    with atomic_path(out_dir) as tmp:
        for name, samples in splits.items():
            rows = (packing.pack_best_fit(samples, run.sequence_len, run.seed) if run.sample_packing
                    else packing.one_per_row(samples))
            records = shards.write_shards(rows, tmp / name)
            manifest["splits"][name] = {
                "samples": len(samples), "rows": len(rows), "shards": records,
                "tokens": sum(r["tokens"] for r in records),
                "trained_tokens": sum(r["trained_tokens"] for r in records),
                "packing_efficiency": round(packing.packing_efficiency(rows, run.sequence_len), 4),
            }
        with open(tmp / "val_prompts.jsonl", "w") as fh:
            for p in prompts:
                fh.write(json.dumps(p) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
