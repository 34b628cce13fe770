"""``precompute_ref_log_probs``: the reference model's log-probs of every training row, computed once.

DPO and KTO compare the policy with a reference that never changes: a frozen copy of the base (a full
fine-tune) or the base with its adapters off. Its log-probs of a row are the same at every epoch, so
instead of a reference forward pass in every training step, each rank runs one pass over its own rows
(the rows its shard reader yields, the only ones it ever trains on) before the first step, under
no_grad, and the loop puts each batch's values in the batch (``REFERENCE_LOGPS``), where
:class:`tunedag.train.preference.PreferenceObjective` takes them instead of running the reference.

The table is written next to the checkpoints (``reference_logps.rank{r}.npz``, atomically) with the
checkpoints' resume key: a resumed run reads it instead of computing it again; a table written for
another config, data or base model is computed again.
"""
from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunedag.data.batches import collate
from tunedag.data.shards import ShardReader
from tunedag.io import atomic_path

log = logging.getLogger(__name__)


class ReferenceTable:
    """Per-segment reference log-probs of a rank's rows: row ``i``'s are ``values[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self.offsets, self.values = offsets, values

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def for_rows(self, rows: list[int]) -> torch.Tensor:
        """The log-probs of ``rows``' segments, row by row, segment by segment (a batch's segment order)."""
        return torch.from_numpy(np.concatenate([self.values[self.offsets[i]:self.offsets[i + 1]] for i in rows]))


def reference_table(engine: Any, reader: ShardReader, micro_batch_size: int, pad_id: int, path: Path,
                    key: str) -> ReferenceTable:
    """The reference log-probs of every row ``reader`` yields: read from ``path`` when it was written with
    resume key ``key``, else computed with ``engine.reference_logps`` a micro-batch at a time and written there."""
    if path.is_file():
        try:
            with np.load(path) as saved:
                if str(saved["key"]) == key and len(saved["offsets"]) == len(reader) + 1:
                    log.info("precompute_ref_log_probs: reading the reference log-probs from %s", path)
                    return ReferenceTable(saved["offsets"], saved["values"])
            log.info("precompute_ref_log_probs: %s was written for another run; computing it again", path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            log.warning("precompute_ref_log_probs: %s is unreadable (%s); computing it again", path, err)
    started = time.perf_counter()
    counts, values = [], []
    with torch.no_grad():
        for start in range(0, len(reader), micro_batch_size):
            rows = [reader.row(i) for i in range(start, min(start + micro_batch_size, len(reader)))]
            values.append(engine.reference_logps(collate(rows, pad_id)).logps.float().cpu().numpy())
            counts += [len(row["segment_labels"]) for row in rows]
    table = ReferenceTable(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                           np.concatenate(values) if values else np.zeros(0, np.float32))
    if table.offsets[-1] != len(table.values):
        raise RuntimeError(f"precompute_ref_log_probs: {len(table.values)} reference log-probs for "
                           f"{table.offsets[-1]} segments")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), offsets=table.offsets, values=table.values)
    log.info("precompute_ref_log_probs: %d rows' reference log-probs in %.1f s", len(reader),
             time.perf_counter() - started)
    return table
