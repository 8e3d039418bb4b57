"""Attention pair statistics from the causal entries alone (engine.causal_stats) against the
plain path: the future zeroed explicitly (engine.compare.future_to_zero), then engine.stats'
tensor_stats and diff_stats over every entry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.causal_stats import causal_entries, causal_pair_stats, full_index
from engine.compare import future_to_zero, make_cell
from engine.forward import Capture
from engine.stats import diff_stats, tensor_stats

F32 = np.float32


def attention_pair(seed: int, heads: int, seq: int, noise: float = 1e-3):
    """Two softmax-like [heads, seq, seq] float32 tensors with garbage above the diagonal (a
    runtime may leave anything there: -inf scores, NaN, stale values)."""
    rng = np.random.default_rng(seed)
    a = rng.random((heads, seq, seq), dtype=F32)
    b = (a + rng.standard_normal((heads, seq, seq)).astype(F32) * F32(noise)).astype(F32)
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    garbage = rng.choice([np.nan, -np.inf, 7.0], size=(heads, int(future.sum())))
    a[:, future] = garbage.astype(F32)
    b[:, future] = -np.inf
    a[0, seq - 1, 0] = b[0, seq - 1, 0] = 0.0  # a causal pair of zeros
    return a.reshape(-1), b.reshape(-1)


def plain(a, b, seq):
    za, zb = future_to_zero(a, seq), future_to_zero(b, seq)
    return tensor_stats(za), tensor_stats(zb), diff_stats(za, zb)


def assert_stats_close(got, want):
    for field in dataclasses.fields(want):
        g, w = getattr(got, field.name), getattr(want, field.name)
        if isinstance(w, int):
            assert g == w, field.name
        else:
            assert g == pytest.approx(w, rel=1e-12, abs=1e-300), field.name


@pytest.mark.parametrize(("seed", "heads", "seq"), [(0, 3, 7), (1, 9, 37), (2, 2, 300), (3, 4, 2)])
def test_causal_entries_give_the_plain_paths_statistics(seed, heads, seq):
    a, b = attention_pair(seed, heads, seq)
    got = causal_pair_stats(a, b, seq)
    assert got is not None
    want = plain(a, b, seq)
    assert got[2] == want[2]  # diff statistics bit for bit, top-K included
    assert_stats_close(got[0], want[0])
    assert_stats_close(got[1], want[1])


def test_ties_in_the_top_k_keep_ascending_index():
    seq, heads = 6, 2
    a = np.zeros((heads, seq, seq), dtype=F32)
    b = np.zeros((heads, seq, seq), dtype=F32)
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    b[:, causal] = 1.0  # every causal d is 1.0: the top-K is the first K causal indices
    a, b = a.reshape(-1), b.reshape(-1)
    got = causal_pair_stats(a, b, seq)
    assert got is not None
    assert got[2] == plain(a, b, seq)[2]
    assert [t.index for t in got[2].top_diffs] == [0, 6, 7, 12, 13, 14, 18, 19, 20, 21]


def test_the_plain_path_decides_nan_few_differences_and_other_shapes():
    a, b = attention_pair(4, 2, 9)
    nan_a = a.copy()
    nan_a[9 * 4 + 2] = np.nan  # a causal NaN: apr's NaN order depends on positions
    assert causal_pair_stats(nan_a, b, 9) is None
    assert causal_pair_stats(a, a.copy(), 9) is None  # no difference: the future's zeros tie
    assert causal_pair_stats(a[:-1], b[:-1], 9) is None  # not [heads, seq, seq]
    assert causal_pair_stats(a, b[::-1].copy(), 1) is None  # one token: no future


def test_full_index_maps_every_causal_entry_to_its_payload_position():
    for seq in (1, 2, 3, 10, 33):
        heads = 3
        flat = np.arange(heads * seq * seq, dtype=np.int64)
        expected = causal_entries(flat.astype(np.float64), seq).astype(np.int64)
        assert [full_index(i, seq) for i in range(expected.size)] == expected.tolist()


def test_make_cell_takes_the_causal_path_with_the_plain_answer():
    seq, heads = 37, 9
    a, b = attention_pair(5, heads, seq)
    shape = (heads, seq, seq)
    cell = make_cell(
        Capture(3, "attn_softmax", a.reshape(shape), shape),
        Capture(3, "attn_softmax", b.reshape(shape), shape),
        seq_len=seq,
    )
    stats_a, stats_b, diff = plain(a, b, seq)
    assert cell.diff == diff
    assert_stats_close(cell.stats_a, stats_a)
    assert_stats_close(cell.stats_b, stats_b)
    assert cell.shape == shape


# ------------------------------------------------------------------------- streamed (long prompts)


class RowBlocks:
    """A lazy `[heads, seq, seq]` capture over an array: `blocks()` yields `rows` query rows of
    one head at a time, in payload order, garbage above the diagonal included."""

    def __init__(self, array: np.ndarray, heads: int, seq: int, rows: int) -> None:
        self.square = array.reshape(heads, seq, seq)
        self.heads, self.seq, self.rows = heads, seq, rows
        self.size = array.size
        self.shape = self.square.shape

    def blocks(self, rows=None):
        step = rows or self.rows
        for head in range(self.heads):
            for start in range(0, self.seq, step):
                block = self.square[head, start : start + step]
                yield (head * self.seq + start) * self.seq, block.reshape(-1).copy()


def streamed_expected(a, b, seq):
    za, zb = future_to_zero(a, seq), future_to_zero(b, seq)
    return tensor_stats(za), tensor_stats(zb), diff_stats(za, zb)


@pytest.mark.parametrize(("heads", "seq", "rows"), [(3, 40, 7), (2, 33, 33), (1, 12, 1)])
def test_streamed_causal_pairs_give_the_plain_statistics(heads, seq, rows):
    from engine.causal_stats import causal_streamed_pair_stats

    a, b = attention_pair(7, heads, seq)
    lazy_a = RowBlocks(a, heads, seq, rows)
    for y in (RowBlocks(b, heads, seq, rows), b):  # lazy against lazy, lazy against an array
        got = causal_streamed_pair_stats(lazy_a, y, seq)
        assert got is not None
        want = streamed_expected(a, b, seq)
        assert got[2] == want[2]
        assert_stats_close(got[0], want[0])
        assert_stats_close(got[1], want[1])


@pytest.mark.parametrize("differing", [0, 3])
def test_streamed_top_k_takes_the_lowest_zero_pairs_when_few_entries_differ(differing):
    """With fewer than K differences the top-K is filled by d = 0 pairs in index order:
    causal entries that agree and the future's zeros alike."""
    from engine.causal_stats import causal_streamed_pair_stats

    heads, seq = 2, 9
    a, _ = attention_pair(8, heads, seq)
    b = a.copy()
    causal = np.flatnonzero(np.tile(np.tril(np.ones((seq, seq), dtype=bool)).ravel(), heads))
    b[causal[[40, 41, 60][:differing]]] += F32(0.5)
    got = causal_streamed_pair_stats(RowBlocks(a, heads, seq, 4), RowBlocks(b, heads, seq, 4), seq)
    assert got is not None
    assert got[2] == streamed_expected(a, b, seq)[2]
    assert len(got[2].top_diffs) == 10


def test_streamed_nan_goes_back_to_the_plain_path():
    from engine.causal_stats import causal_streamed_pair_stats

    heads, seq = 2, 9
    a, b = attention_pair(9, heads, seq)
    a[seq * 5 + 1] = np.nan  # causal (row 5, key 1)
    assert causal_streamed_pair_stats(RowBlocks(a, heads, seq, 4), b, seq) is None


def test_make_cell_streams_a_real_long_prompt_attention_stage_from_its_causal_entries():
    """Two passes' lazy attention stages (engine.attention.AttentionStage): the cell equals
    the one from the materialised, future-zeroed arrays."""
    from engine.attention import AttentionStage

    rng = np.random.default_rng(10)
    seq, nh, nkv, hd = 37, 4, 2, 8
    q = rng.standard_normal((seq, nh, hd)).astype(F32)
    k = rng.standard_normal((seq, nkv, hd)).astype(F32)
    k2 = (k + rng.standard_normal(k.shape).astype(F32) * F32(0.01)).astype(F32)
    for stage in ("attn_scores", "attn_softmax"):
        x = AttentionStage(np, stage, q, k, 0.35)
        y = AttentionStage(np, stage, q, k2, 0.35)
        cell = make_cell(Capture(1, stage, x, x.shape), Capture(1, stage, y, y.shape), seq_len=seq)
        stats_a, stats_b, diff = plain(np.asarray(x).reshape(-1), np.asarray(y).reshape(-1), seq)
        assert cell.diff == diff
        assert_stats_close(cell.stats_a, stats_a)
        assert_stats_close(cell.stats_b, stats_b)
