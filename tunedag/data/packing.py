"""Sample packing: place tokenized samples into rows of ``sequence_len`` tokens.

Best-fit-decreasing over a seeded order: samples are shuffled with the seed, sorted by length
(longest first, stable, so ties keep the seeded order), and each goes into the fullest row that
still has room for it. It fills rows at least as tightly as first-fit-decreasing and finds the
row by bisection instead of a scan. Each packed row keeps its samples' boundaries (``cu_seqlens``) and positions that restart
at 0 for every sample, so training can forbid attention across samples.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from tunedag.data.formats import Sample


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=lambda: [0])

    def add(self, sample: Sample) -> None:
        self.input_ids += sample.input_ids
        self.labels += sample.labels
        self.position_ids += range(len(sample.input_ids))
        self.cu_seqlens.append(len(self.input_ids))


def pack_best_fit(samples: list[Sample], sequence_len: int, seed: int) -> list[PackedRow]:
    """Pack ``samples`` (each at most ``sequence_len`` long) best-fit-decreasing.

    Rows are kept in a list sorted by free space so the first row that fits is found by
    bisection: O(n log n) for n samples.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(samples[i].input_ids))
    rows: list[PackedRow] = []
    by_free: list[tuple[int, int]] = []  # (free tokens, row index), ascending
    for i in order:
        n = len(samples[i].input_ids)
        if n > sequence_len:
            raise ValueError(f"sample of {n} tokens does not fit sequence_len {sequence_len}")
        at = bisect.bisect_left(by_free, (n, -1))
        if at == len(by_free):
            rows.append(PackedRow())
            row_index, free = len(rows) - 1, sequence_len
        else:
            free, row_index = by_free.pop(at)
        rows[row_index].add(samples[i])
        bisect.insort(by_free, (free - n, row_index))
    return rows


def one_per_row(samples: list[Sample]) -> list[PackedRow]:
    """No packing: each sample is its own row (padded at batch time)."""
    rows = []
    for sample in samples:
        row = PackedRow()
        row.add(sample)
        rows.append(row)
    return rows


def packing_efficiency(rows: list[PackedRow], sequence_len: int) -> float:
    """Real tokens over token slots (rows × sequence_len)."""
    if not rows:
        return 0.0
    return sum(len(r.input_ids) for r in rows) / (len(rows) * sequence_len)
