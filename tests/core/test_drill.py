"""engine.drill: a long attention cell's drill-down views, a block at a time, equal to what the
small-cell path computes from whole arrays (checked here on a small lazy capture that can also
be materialised), and a lazy capture saved as APRT a block at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aprtui.widgets.token_strip import per_token_cosine, per_token_rows
from engine.aprt import read_aprt, write_aprt
from engine.attention import AttentionStage
from engine.drill import decade_histogram, streamed_details
from engine.stats import diff_stats

HEADS, SEQ, KV, HD = 4, 40, 2, 8


def lazy_pair(stage: str, seed: int) -> tuple[AttentionStage, AttentionStage]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((SEQ, HEADS, HD)).astype(np.float32)
    k = rng.standard_normal((SEQ, KV, HD)).astype(np.float32)
    q_b = (q + np.float32(0.01) * rng.standard_normal(q.shape)).astype(np.float32)
    return (
        AttentionStage(np, stage, q, k, HD**-0.5),
        AttentionStage(np, stage, q_b, k, HD**-0.5),
    )


def reference_decades(values: np.ndarray) -> list[tuple[str, int]]:
    """The histogram by decade, one value at a time in Python: "0" for exact zeros, then "1eN"
    for every decade from the lowest to the highest present (empty ones included, count 0),
    then "NaN/Inf"."""
    zeros = nonfinite = 0
    decades: dict[int, int] = {}
    for value in np.abs(np.asarray(values, dtype=np.float64)).ravel().tolist():
        if not math.isfinite(value):
            nonfinite += 1
        elif value == 0.0:
            zeros += 1
        else:
            decade = math.floor(math.log10(value))
            decades[decade] = decades.get(decade, 0) + 1
    bins = [("0", zeros)] if zeros else []
    if decades:
        low, high = min(decades), max(decades)
        bins += [(f"1e{d}", decades.get(d, 0)) for d in range(low, high + 1)]
    return bins + ([("NaN/Inf", nonfinite)] if nonfinite else [])


def reference_cosine_per_query(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[seq]: cosine of A and B over every head's row of query position q, in float64."""
    a3 = a.reshape(HEADS, SEQ, SEQ).astype(np.float64)
    b3 = b.reshape(HEADS, SEQ, SEQ).astype(np.float64)
    cosines = []
    for q in range(SEQ):
        x, y = a3[:, q, :].ravel(), b3[:, q, :].ravel()
        cosines.append(float(x @ y) / math.sqrt(float(x @ x) * float(y @ y)))
    return np.array(cosines)


def test_decade_histogram_counts_every_value_in_its_decade():
    values = np.array([0.0, -0.0, 3e-5, 0.5, -0.7, 2.0, 150.0, np.inf, np.nan, 1e-9])
    expected = [("0", 2), ("1e-9", 1), ("1e-8", 0), ("1e-7", 0), ("1e-6", 0), ("1e-5", 1)]
    expected += [("1e-4", 0), ("1e-3", 0), ("1e-2", 0), ("1e-1", 2), ("1e0", 1), ("1e1", 0)]
    expected += [("1e2", 1), ("NaN/Inf", 2)]
    assert decade_histogram(values) == expected
    assert reference_decades(values) == expected  # the oracle agrees on the hand count


class SmallBlocks:
    """A lazy capture whose blocks are 7 query rows: many blocks, some crossing no head edge."""

    def __init__(self, stage: AttentionStage) -> None:
        self.stage, self.shape, self.size = stage, stage.shape, stage.size

    def blocks(self, rows=None):
        return self.stage.blocks(rows or 7)

    def whole(self) -> np.ndarray:
        """The values the blocks hold, flat (a matmul's last bits depend on the block shape,
        so the reference is built from the same blocks)."""
        return np.concatenate([block.ravel() for _, block in self.blocks()])


@pytest.mark.parametrize("stage", ["attn_scores", "attn_softmax"])
def test_streamed_details_equal_the_whole_array_views(stage):
    lazy_a, lazy_b = (SmallBlocks(x) for x in lazy_pair(stage, seed=5))
    a, b = lazy_a.whole(), lazy_b.whole()  # [heads * seq * seq]
    streamed = streamed_details(lazy_a, lazy_b, top_k=20)
    # the small-cell path's own functions, on the whole arrays, and independent formulas
    rows_a, rows_b = (per_token_rows(x, (HEADS, SEQ, SEQ), SEQ) for x in (a, b))
    np.testing.assert_allclose(streamed.per_token, per_token_cosine(rows_a, rows_b), rtol=1e-12)
    np.testing.assert_allclose(streamed.per_token, reference_cosine_per_query(a, b), rtol=1e-9)
    assert streamed.histogram == reference_decades(np.abs(a - b))
    assert streamed.top == diff_stats(a, b, limit=20).top_diffs
    assert streamed.cosine and streamed.histogram_title == "|A-B| per decade"


def test_streamed_details_without_a_reference_show_side_a():
    lazy_a = SmallBlocks(lazy_pair("attn_scores", seed=6)[0])
    a = lazy_a.whole()
    streamed = streamed_details(lazy_a, None, top_k=5)
    square = a.reshape(HEADS, SEQ, SEQ).astype(np.float64)  # RMS over every head's row q
    rms = np.sqrt(np.mean(square.transpose(1, 0, 2).reshape(SEQ, -1) ** 2, axis=1))
    np.testing.assert_allclose(streamed.per_token, rms, rtol=1e-12)
    largest = np.argsort(-np.abs(a), kind="stable")[:5]
    assert [t.index for t in streamed.top] == largest.tolist()
    assert all(np.isnan(t.b) for t in streamed.top)
    assert streamed.histogram == reference_decades(np.abs(a))


def test_streamed_details_pair_a_lazy_side_with_an_array_in_apr_convention():
    # A runtime's array keeps -inf (or anything) above the diagonal; the comparison's
    # convention sets it to 0.0, so only the causal entries differ.
    lazy_a, lazy_b = (SmallBlocks(x) for x in lazy_pair("attn_scores", seed=7))
    b = lazy_b.whole().reshape(HEADS, SEQ, SEQ)
    b[:, np.triu(np.ones((SEQ, SEQ), dtype=bool), k=1)] = -1e4
    streamed = streamed_details(lazy_a, b, top_k=3)
    reference = streamed_details(lazy_a, lazy_b, top_k=3)
    assert streamed.top == reference.top
    assert streamed.histogram == reference.histogram


def test_a_lazy_capture_is_saved_block_by_block_as_its_whole_array(tmp_path):
    lazy_a = SmallBlocks(lazy_pair("attn_softmax", seed=8)[0])
    path = write_aprt(tmp_path / "softmax.bin", 3, lazy_a)
    saved = read_aprt(path)
    assert saved.layer == 3
    np.testing.assert_array_equal(saved.values, lazy_a.whole())
