"""Packed Arrow shards: the contract between tokenize and train/evaluate.

A split folder (``train/`` or ``val/``) holds ``shard-00000.arrow``… : Arrow IPC files (memory-
mappable) of at most ``MAX_TOKENS_PER_SHARD`` tokens, one packed row per record:

| column | type | meaning |
| --- | --- | --- |
| input_ids | list<int32> | the row's tokens (samples back to back; no padding) |
| labels | list<int32> | the token itself where trained (objective prm: the step's class), -100 elsewhere (not shifted) |
| position_ids | list<int32> | 0, 1, … restarting at every sample (every segment of a pair) |
| cu_seqlens | list<int32> | 0 and each sample's (segment's) end inside the row |
| segment_labels | list<int8> | preference data only: one per segment (see below) |

Preference data (``objective`` dpo or kto in the manifest) uses the same rows, so the same
packed attention mask and loss code apply. dpo: a pair is two adjacent segments, chosen then
rejected, never split across rows; ``segment_labels`` reads 1, 0, 1, 0, … and each segment
has its prompt masked (-100), so a policy's sequence log-probability is the sum of its
token log-probs over the segment's trained positions. kto: one segment per sample, labelled
1 (desirable) or 0 (undesirable).

``manifest.json`` records each shard's sha256; ``verify_shards`` checks them before train and
evaluate read a split, so a truncated or overwritten shard stops the stage with the fix instead
of a pyarrow traceback or, worse, training on other data with exit 0.

``ShardReader`` reads them zero-copy and yields rows in a seeded order per epoch, split by rank,
from any row offset: rows consumed so far are the exact resume position.
"""
from __future__ import annotations

import bisect
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from tunedag.data.formats import IGNORE_INDEX
from tunedag.data.packing import PackedRows
from tunedag.errors import TunedagError
from tunedag.io import sha256_file

ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("cu_seqlens", pa.list_(pa.int32())),
])
PREFERENCE_SCHEMA = ROW_SCHEMA.append(pa.field("segment_labels", pa.list_(pa.int8())))
MAX_TOKENS_PER_SHARD = 1 << 24  # 16M tokens: ~200 MB per shard with the four int32 columns


RERUN = "rerun tokenize (snakemake --forcerun tokenize)"


class ShardIntegrityError(TunedagError, ValueError):
    """A shard that is not the one tokenize wrote: missing, changed, unlisted or unreadable."""


def verify_shards(split_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check ``split_dir``'s shards against ``manifest``: each listed shard is there with its sha256,
    and no other ``shard-*.arrow`` is. Hashing reads every byte: about 1 s per GB of shards."""
    split_dir = Path(split_dir)
    split = manifest.get("splits", {}).get(split_dir.name)
    if split is None:
        raise ShardIntegrityError(f"{split_dir.parent / 'manifest.json'}: no {split_dir.name!r} split listed; {RERUN}")
    listed = {Path(r["path"]).name: r["sha256"] for r in split["shards"]}
    for name, expected in listed.items():  # the cheap checks first, then the hashing
        if not (split_dir / name).is_file():
            raise ShardIntegrityError(f"{split_dir / name}: missing (manifest.json lists it with sha256 {expected}); "
                                      f"{RERUN}")
    extra = sorted(p.name for p in split_dir.glob("shard-*.arrow") if p.name not in listed)
    if extra:
        raise ShardIntegrityError(f"{split_dir / extra[0]}: not listed in manifest.json ({len(extra)} unlisted "
                                  f"shard(s)), so it was not written by the tokenize run that made the others; {RERUN}")
    for name, expected in listed.items():
        found = sha256_file(split_dir / name)
        if found != expected:
            raise ShardIntegrityError(f"{split_dir / name}: sha256 {found}, but manifest.json records {expected}: "
                                      f"the shard changed after tokenize wrote it (truncated or overwritten?); {RERUN}")


def _list(offsets: np.ndarray, values: np.ndarray, kind: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=kind))


def _batch(rows: PackedRows, a: int, b: int, schema: pa.Schema) -> pa.RecordBatch:
    """Rows [a, b) of ``rows`` as one record batch."""
    t0, t1 = rows.row_offsets[a], rows.row_offsets[b]
    c0, c1 = rows.cu_offsets[a], rows.cu_offsets[b]
    tok_off = rows.row_offsets[a:b + 1] - t0
    arrays = [_list(tok_off, rows.input_ids[t0:t1], pa.int32()), _list(tok_off, rows.labels[t0:t1], pa.int32()),
              _list(tok_off, rows.position_ids[t0:t1], pa.int32()),
              _list(rows.cu_offsets[a:b + 1] - c0, rows.cu_seqlens[c0:c1], pa.int32())]
    if "segment_labels" in schema.names:
        seg_off = (rows.cu_offsets[a:b + 1] - np.arange(a, b + 1)) - (c0 - a)  # segments = cu entries - 1
        arrays.append(_list(seg_off, rows.segment_labels[c0 - a:c1 - b], pa.int8()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class ShardWriter:
    """Append packed rows to ``{split_dir}/{prefix}{k:05d}.arrow`` files of bounded size."""

    def __init__(self, split_dir: Path, prefix: str = "shard-", preference: bool = False,
                 max_tokens: int = MAX_TOKENS_PER_SHARD):
        self.split_dir, self.prefix, self.max_tokens = Path(split_dir), prefix, max_tokens
        self.schema = PREFERENCE_SCHEMA if preference else ROW_SCHEMA
        self.records: list[dict[str, Any]] = []
        self._sink = self._writer = None
        self._stats: dict[str, Any] = {}

    def _open(self) -> None:
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.split_dir / f"{self.prefix}{len(self.records):05d}.arrow"
        self._sink = pa.OSFile(str(self._path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._stats = {"rows": 0, "tokens": 0, "trained_tokens": 0, "samples": 0}

    def _close(self) -> None:
        self._writer.close()
        self._sink.close()
        self.records.append({"path": f"{self.split_dir.name}/{self._path.name}", **self._stats,
                             "sha256": sha256_file(self._path)})
        self._sink = self._writer = None

    def write(self, rows: PackedRows) -> None:
        start = 0
        while start < rows.num_rows:
            if self._writer is None:
                self._open()
            room = self.max_tokens - self._stats["tokens"]
            # rows [start, end) that fit the current shard (at least one row per shard)
            end = int(np.searchsorted(rows.row_offsets, rows.row_offsets[start] + room, side="right")) - 1
            end = min(max(end, start + (self._stats["rows"] == 0)), rows.num_rows)
            if end == start:
                self._close()
                continue
            t0, t1 = rows.row_offsets[start], rows.row_offsets[end]
            self._writer.write_batch(_batch(rows, start, end, self.schema))
            self._stats["rows"] += end - start
            self._stats["tokens"] += int(t1 - t0)
            self._stats["trained_tokens"] += int(np.count_nonzero(rows.labels[t0:t1] != IGNORE_INDEX))
            self._stats["samples"] += int(rows.samples_per_row[start:end].sum())
            start = end

    def close(self, keep_empty: bool = False) -> list[dict[str, Any]]:
        """Finish the last file; return one manifest record per file written."""
        if self._writer is None and keep_empty and not self.records:
            self._open()
        if self._writer is not None:
            self._close()
        return self.records


def _read_table(path: Path) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardIntegrityError(f"{path}: not a readable Arrow shard ({err}); {RERUN}") from None


class ShardReader:
    """Rows of one split, memory-mapped; a seeded permutation per epoch, sliced per rank."""

    def __init__(self, split_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.split_dir = Path(split_dir)
        paths = sorted(self.split_dir.glob("shard-*.arrow"))
        if not paths:
            raise FileNotFoundError(f"{self.split_dir}: no shard-*.arrow files (run the tokenize stage)")
        self.tables = [_read_table(p) for p in paths]
        self.columns = self.tables[0].schema.names
        self._starts = np.concatenate([[0], np.cumsum([t.num_rows for t in self.tables])]).tolist()
        self.rank, self.world_size = rank, world_size

    @property
    def num_rows(self) -> int:
        """Rows in the split (all ranks)."""
        return self._starts[-1]

    def __len__(self) -> int:
        """Rows this rank sees per epoch (every rank sees the same count; the tail is dropped)."""
        return self.num_rows // self.world_size if self.world_size > 1 else self.num_rows

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` of the split (global index) as zero-copy numpy views."""
        t = bisect.bisect_right(self._starts, i) - 1
        table, r = self.tables[t], i - self._starts[t]
        return {name: table.column(name)[r].values.to_numpy(zero_copy_only=True) for name in self.columns}

    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        """This rank's global row indices for ``epoch``, in the order it reads them."""
        order = list(range(self.num_rows))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        if self.world_size > 1:
            order = order[: len(self) * self.world_size][self.rank::self.world_size]
        return order

    def iter_rows(self, epoch: int, seed: int, start: int = 0,
                  shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of ``epoch`` from position ``start`` (to resume mid-epoch)."""
        for i in self.epoch_order(epoch, seed, shuffle)[start:]:
            yield self.row(i)

    def stream(self, seed: int, epoch: int = 0, offset: int = 0, shuffle: bool = True,
               num_epochs: int | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(epoch, offset, row)`` from a saved position on, where (epoch, offset) is the position
        *after* the row: saving it and restarting there resumes at exactly the next row."""
        while num_epochs is None or epoch < num_epochs:
            order = self.epoch_order(epoch, seed, shuffle)
            for k in range(offset, len(order)):
                yield epoch, k + 1, self.row(order[k])
            epoch, offset = epoch + 1, 0
