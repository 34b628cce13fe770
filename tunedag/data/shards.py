"""Packed Arrow shards: the contract between tokenize and train/evaluate.

A split folder (``train/`` or ``val/``) holds ``shard-00000.arrow``… : Arrow IPC files (memory-
mappable) with one packed row per record: ``input_ids``, ``labels``, ``position_ids`` (restarting
at 0 for every sample) and ``cu_seqlens`` (sample boundaries). ``ShardReader`` reads them
zero-copy and yields rows in a seeded order per epoch, split by rank, from any offset.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from tunedag.data.packing import PackedRow
from tunedag.io import atomic_path, sha256_file

ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("cu_seqlens", pa.list_(pa.int32())),
])
MAX_TOKENS_PER_SHARD = 1 << 24  # 16M tokens: ~200 MB per shard with the four int32 columns


def write_shards(rows: list[PackedRow], split_dir: Path) -> list[dict[str, Any]]:
    """Write ``rows`` as shards under ``split_dir``; return one record per shard for the manifest."""
    split_dir.mkdir(parents=True, exist_ok=True)
    records, start = [], 0
    while start < len(rows) or not records:
        end, tokens = start, 0
        while end < len(rows) and (end == start or tokens + len(rows[end].input_ids) <= MAX_TOKENS_PER_SHARD):
            tokens += len(rows[end].input_ids)
            end += 1
        chunk = rows[start:end]
        table = pa.table({name: [getattr(r, name) for r in chunk] for name in ROW_SCHEMA.names},
                         schema=ROW_SCHEMA)
        path = split_dir / f"shard-{len(records):05d}.arrow"
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, ROW_SCHEMA) as writer:
                writer.write_table(table)
        records.append({
            "path": f"{split_dir.name}/{path.name}", "rows": len(chunk), "tokens": tokens,
            "trained_tokens": sum(sum(1 for t in r.labels if t != -100) for r in chunk),
            "samples": sum(len(r.cu_seqlens) - 1 for r in chunk), "sha256": sha256_file(path),
        })
        start = end
        if not rows:
            break
    return records


class ShardReader:
    """Rows of one split, memory-mapped; a seeded permutation per epoch, sliced per rank."""

    def __init__(self, split_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.split_dir = Path(split_dir)
        paths = sorted(self.split_dir.glob("shard-*.arrow"))
        if not paths:
            raise FileNotFoundError(f"{self.split_dir}: no shard-*.arrow files (run the tokenize stage)")
        self.tables = [pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all() for p in paths]
        self.index = [(t, r) for t, table in enumerate(self.tables) for r in range(table.num_rows)]
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Rows this rank sees per epoch (every rank sees the same count; the tail is dropped)."""
        return len(self.index) // self.world_size if self.world_size > 1 else len(self.index)

    def row(self, i: int) -> dict[str, np.ndarray]:
        t, r = self.index[i]
        table = self.tables[t]
        return {name: table.column(name)[r].values.to_numpy(zero_copy_only=True)
                for name in ROW_SCHEMA.names}

    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        order = list(range(len(self.index)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        if self.world_size > 1:
            order = order[: len(self)*self.world_size][self.rank::self.world_size]
        return order

    def iter_rows(self, epoch: int, seed: int, start: int = 0,
                  shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of ``epoch`` from position ``start`` (to resume mid-epoch)."""
        for i in self.epoch_order(epoch, seed, shuffle)[start:]:
            yield self.row(i)
