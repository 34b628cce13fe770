"""First-fit-decreasing packing: invariants, agreement with a plain FFD, efficiency, pairs."""
from collections import Counter

import numpy as np
import pytest

from tunedag.data.formats import Sample
from tunedag.data.packing import first_fit_decreasing, one_per_row, pack_first_fit, packing_efficiency


def naive_ffd(lengths, capacity, seed):
    """The textbook O(n · bins) FFD over the same seeded order."""
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    order = shuffled[np.argsort(-np.asarray(lengths)[shuffled], kind="stable")]
    free, bins = [], []
    for i in order:
        k = next((b for b, f in enumerate(free) if f >= lengths[i]), None)
        if k is None:
            free.append(capacity)
            k = len(free) - 1
        free[k] -= lengths[i]
        bins.append(k)
    return order, np.array(bins)


def samples_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(rng.integers(0, 1000, n).tolist(), rng.integers(-100, 1000, n).tolist()) for n in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_tree_ffd_equals_the_textbook_ffd(seed):
    lengths = np.random.default_rng(seed).integers(1, 65, 700)
    order, bins = first_fit_decreasing(lengths, 64, seed)
    ref_order, ref_bins = naive_ffd(lengths, 64, seed)
    assert order.tolist() == ref_order.tolist() and bins.tolist() == ref_bins.tolist()


def test_packing_keeps_every_token_once_and_restarts_positions():
    samples = samples_of([5, 17, 3, 31, 9, 12, 30, 1, 8, 32, 2, 16])
    rows = pack_first_fit(samples, 32, seed=3)
    rows_list = [rows.row(r) for r in range(rows.num_rows)]
    seen = Counter()
    for row in rows_list:
        cu = row["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == len(row["input_ids"]) == len(row["labels"]) <= 32
        for a, b in zip(cu, cu[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            seen[(tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b]))] += 1
    assert seen == Counter((tuple(s.input_ids), tuple(s.labels)) for s in samples)
    total = sum(len(s) for s in samples)
    assert rows.num_rows == -(-total // 32)  # 166 tokens: FFD reaches the lower bound of 6 rows here
    assert packing_efficiency(total, rows.num_rows, 32) == pytest.approx(166 / 192)
    again = pack_first_fit(samples, 32, seed=3)
    assert np.array_equal(again.input_ids, rows.input_ids) and np.array_equal(again.cu_seqlens, rows.cu_seqlens)


def test_realistic_lengths_pack_above_95_percent():
    """Log-normal lengths (median ~300 tokens, long tail cut at 2048), like chat/instruction data."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, 20_000).astype(int), 8, 2048)
    _, bins = first_fit_decreasing(lengths, 2048, seed=0)
    assert packing_efficiency(int(lengths.sum()), int(bins.max()) + 1, 2048) > 0.95


def test_pairs_stay_adjacent_in_one_row_with_their_labels():
    pairs = [Sample(list(range(a + b)), [1] * (a + b), (a, b), (1, 0)) for a, b in [(3, 4), (5, 2), (6, 6), (1, 1)]]
    rows = pack_first_fit(pairs, 12, seed=0)
    got = [rows.row(r) for r in range(rows.num_rows)]
    assert sum(len(r["segment_labels"]) for r in got) == 8
    for row in got:
        cu = row["cu_seqlens"]
        assert row["segment_labels"] == [1, 0] * (len(cu) // 2)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        assert sorted(zip(lengths[::2], lengths[1::2])) == sorted(p.segments for p in pairs if p.segments in
                                                                  list(zip(lengths[::2], lengths[1::2])))


def test_one_per_row_and_oversized_samples():
    rows = one_per_row(samples_of([3, 5]))
    assert rows.num_rows == 2 and rows.row(1)["cu_seqlens"] == [0, 5]
    with pytest.raises(ValueError, match="sample of 40 tokens does not fit sequence_len 32"):
        pack_first_fit(samples_of([40]), 32, 0)
